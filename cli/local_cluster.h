// `moe-serve serve --local-cluster`: every role as its own process of this binary on
// loopback, supervised by the calling process.
//
// The supervisor picks free loopback ports (an expert rank needs two in a row: data plane
// and ExpertControl), writes the deployment YAML the roles share (the caller's deployment
// with model.path, roles and ports filled in) into a private folder, and starts the
// scheduler, the expert ranks, the attention workers and the frontend, each with
// `--config FILE` (and `--rank i`). Their stdout and stderr are copied to ours, every line
// prefixed by role and rank ("expert[2]") unless the role's logger already did.
//
// Readiness: the supervisor waits for the frontend's /health to answer 200 (the scheduler
// placed every expert and every attention worker registered), then logs
// "local cluster ready on http://HOST:PORT". A role that exits during startup, or a startup
// longer than startup_timeout, stops every role; the error names the role and how it ended.
//
// Afterwards: SIGTERM/SIGINT stop the roles (frontend first, so it drains; then attention
// workers, expert ranks, scheduler; SIGKILL for one that does not exit in time). An expert
// rank or attention worker that dies is logged and left to the cluster's own recovery (the
// frontend reports it in /v1/cluster); the frontend or the scheduler dying stops everything
// with an error. Children get SIGTERM if the supervisor itself dies (PR_SET_PDEATHSIG).
//
// Threads: RunLocalCluster blocks SIGTERM, SIGINT and SIGCHLD in the calling thread and runs
// until the cluster stops; one reader thread per role copies its output.
#pragma once

#include <ostream>
#include <string>

#include "absl/status/status.h"
#include "config/config.h"

namespace moe::cli {

struct LocalClusterOptions {
  int attention_workers = 1;
  int expert_ranks = 2;
  // The deployment every role reads: model.path must be set; roles and the scheduler
  // address are replaced; server.http_port 0 gets a free port chosen here.
  config::DeploymentConfig deployment;
  // Extra arguments for the scheduler role (e.g. --startup-timeout-ms).
  std::vector<std::string> scheduler_args;
  double startup_timeout_s = 300;
};

// Runs the cluster until a signal or a fatal failure. OK after a clean stop.
absl::Status RunLocalCluster(const LocalClusterOptions& options);

}  // namespace moe::cli
