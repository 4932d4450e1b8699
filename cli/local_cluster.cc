#include "cli/local_cluster.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/logging.h"
#include "common/status.h"

namespace moe::cli {
namespace {

using Clock = std::chrono::steady_clock;

// A loopback port nobody listens on, held (bound) until released so two picks never collide.
class PortPicker {
 public:
  ~PortPicker() { Release(); }
  // One free port, or two in a row (port, port + 1) when `pair`.
  absl::StatusOr<int> Pick(bool pair) {
    for (int attempt = 0; attempt < 200; ++attempt) {
      int fd = Bind(0);
      if (fd < 0) return absl::UnavailableError(absl::StrCat("cannot bind: ", std::strerror(errno)));
      sockaddr_in addr{};
      socklen_t len = sizeof(addr);
      getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len);
      const int port = ntohs(addr.sin_port);
      if (!pair) {
        held_.push_back(fd);
        return port;
      }
      if (port < 65535) {
        int next = Bind(port + 1);
        if (next >= 0) {
          held_.push_back(fd);
          held_.push_back(next);
          return port;
        }
      }
      close(fd);
    }
    return absl::UnavailableError("no two free loopback ports in a row");
  }
  void Release() {
    for (int fd : held_) close(fd);
    held_.clear();
  }

 private:
  static int Bind(int port) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return -1;
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    addr.sin_port = htons(static_cast<uint16_t>(port));
    if (bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
      close(fd);
      return -1;
    }
    return fd;
  }
  std::vector<int> held_;
};

// GET path on 127.0.0.1:port; the HTTP status, or -1 when nothing answered.
int HttpGetStatus(int port, const char* path) {
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return -1;
  timeval tv{.tv_sec = 2, .tv_usec = 0};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = htons(static_cast<uint16_t>(port));
  int status = -1;
  if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0) {
    const std::string req = absl::StrCat("GET ", path, " HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n");
    if (send(fd, req.data(), req.size(), MSG_NOSIGNAL) == static_cast<ssize_t>(req.size())) {
      char buf[64] = {};
      ssize_t n = recv(fd, buf, sizeof(buf) - 1, 0);
      // "HTTP/1.1 200 OK"
      if (n >= 12 && std::strncmp(buf, "HTTP/1.", 7) == 0) status = std::atoi(buf + 9);
    }
  }
  close(fd);
  return status;
}

struct Role {
  std::string name;  // "expert[2]"
  std::vector<std::string> args;
  pid_t pid = -1;
  bool exited = false;
  int wait_status = 0;
  std::thread reader;
  bool essential = false;  // its death stops the cluster
};

std::string DescribeExit(int status) {
  if (WIFEXITED(status)) return absl::StrCat("exited with status ", WEXITSTATUS(status));
  if (WIFSIGNALED(status)) {
    return absl::StrCat("was killed by signal ", WTERMSIG(status), " (",
                        strsignal(WTERMSIG(status)), ")");
  }
  return "stopped";
}

// Copies the role's output to stderr line by line, prefixed with its name unless the role's
// own logger put it there.
void CopyOutput(int fd, std::string name) {
  std::string pending;
  char buf[4096];
  auto emit = [&](std::string line) {
    if (line.find(" " + name + " ") == std::string::npos) line = absl::StrCat(name, ": ", line);
    line += "\n";
    ssize_t ignored = ::write(STDERR_FILENO, line.data(), line.size());
    (void)ignored;
  };
  while (true) {
    ssize_t n = read(fd, buf, sizeof(buf));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    pending.append(buf, static_cast<size_t>(n));
    size_t nl;
    while ((nl = pending.find('\n')) != std::string::npos) {
      emit(pending.substr(0, nl));
      pending.erase(0, nl + 1);
    }
  }
  if (!pending.empty()) emit(pending);
  close(fd);
}

absl::Status Spawn(Role& role, const std::string& exe, const sigset_t& parent_mask) {
  int fds[2];
  if (pipe2(fds, O_CLOEXEC) != 0) {
    return absl::InternalError(absl::StrCat("pipe: ", std::strerror(errno)));
  }
  std::vector<std::string> argv_s = {exe};
  argv_s.insert(argv_s.end(), role.args.begin(), role.args.end());
  std::vector<char*> argv;
  for (std::string& a : argv_s) argv.push_back(a.data());
  argv.push_back(nullptr);
  const pid_t parent = getpid();
  pid_t pid = fork();
  if (pid < 0) {
    close(fds[0]);
    close(fds[1]);
    return absl::InternalError(absl::StrCat("fork: ", std::strerror(errno)));
  }
  if (pid == 0) {
    // Child: only async-signal-safe calls until exec.
    prctl(PR_SET_PDEATHSIG, SIGTERM);
    if (getppid() != parent) _exit(127);
    dup2(fds[1], STDOUT_FILENO);
    dup2(fds[1], STDERR_FILENO);
    sigprocmask(SIG_SETMASK, &parent_mask, nullptr);
    execv(exe.c_str(), argv.data());
    _exit(127);
  }
  close(fds[1]);
  role.pid = pid;
  role.reader = std::thread(CopyOutput, fds[0], role.name);
  return absl::OkStatus();
}

class Supervisor {
 public:
  Supervisor(std::vector<std::unique_ptr<Role>> roles, sigset_t signals)
      : roles_(std::move(roles)), signals_(signals) {}
  ~Supervisor() { StopAll(absl::Seconds(10)); }

  std::vector<std::unique_ptr<Role>>& roles() { return roles_; }

  // Reaps exited children; returns the first role (in spawn order) that exited now.
  Role* Reap() {
    Role* first = nullptr;
    while (true) {
      int status = 0;
      pid_t pid = waitpid(-1, &status, WNOHANG);
      if (pid <= 0) break;
      for (auto& r : roles_) {
        if (r->pid == pid && !r->exited) {
          r->exited = true;
          r->wait_status = status;
          if (first == nullptr) first = r.get();
          MOE_LOG(WARNING) << r->name << " (pid " << pid << ") " << DescribeExit(status);
        }
      }
    }
    return first;
  }

  // Waits up to `timeout` for a signal (SIGTERM/SIGINT/SIGCHLD); returns it or 0.
  int WaitSignal(absl::Duration timeout) {
    timespec ts{.tv_sec = static_cast<time_t>(absl::ToInt64Seconds(timeout)),
                .tv_nsec = static_cast<long>(absl::ToInt64Nanoseconds(timeout) % 1000000000)};
    int sig = sigtimedwait(&signals_, nullptr, &ts);
    return sig < 0 ? 0 : sig;
  }

  // Stops the roles in reverse start order (frontend first), SIGTERM then SIGKILL after
  // `grace`; joins the output readers.
  void StopAll(absl::Duration grace) {
    if (stopped_) return;
    stopped_ = true;
    for (auto it = roles_.rbegin(); it != roles_.rend(); ++it) {
      Role& r = **it;
      if (r.pid <= 0 || r.exited) continue;
      kill(r.pid, SIGTERM);
      const auto deadline = Clock::now() + absl::ToChronoSeconds(grace);
      while (!r.exited && Clock::now() < deadline) {
        int status = 0;
        pid_t pid = waitpid(r.pid, &status, WNOHANG);
        if (pid == r.pid) {
          r.exited = true;
          r.wait_status = status;
          break;
        }
        std::this_thread::sleep_for(std::chrono::milliseconds(20));
      }
      if (!r.exited) {
        MOE_LOG(WARNING) << r.name << " did not stop in time; killing it";
        kill(r.pid, SIGKILL);
        int status = 0;
        waitpid(r.pid, &status, 0);
        r.exited = true;
        r.wait_status = status;
      }
    }
    Reap();
    for (auto& r : roles_) {
      if (r->reader.joinable()) r->reader.join();
    }
  }

 private:
  std::vector<std::unique_ptr<Role>> roles_;
  sigset_t signals_;
  bool stopped_ = false;
};

}  // namespace

absl::Status RunLocalCluster(const LocalClusterOptions& options) {
  namespace fs = std::filesystem;
  common::SetLogPrefix("local-cluster");
  if (options.attention_workers < 1 || options.expert_ranks < 1) {
    return absl::InvalidArgumentError(
        "--attention-workers and --expert-ranks: a local cluster needs at least one of each");
  }
  if (options.deployment.model.path.empty()) {
    return absl::InvalidArgumentError("model.path: the local cluster needs a model directory");
  }
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGINT);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGCHLD);
  sigset_t parent_mask;
  pthread_sigmask(SIG_BLOCK, &signals, &parent_mask);

  config::DeploymentConfig d = options.deployment;
  d.server.host = "127.0.0.1";
  PortPicker ports;
  if (d.server.http_port == 0) {
    MOE_ASSIGN_OR_RETURN(d.server.http_port, ports.Pick(false));
  }
  MOE_ASSIGN_OR_RETURN(int scheduler_port, ports.Pick(false));
  d.roles.frontend.address = config::kInProcess;
  d.roles.scheduler.address = absl::StrCat("127.0.0.1:", scheduler_port);
  d.roles.attention_workers.clear();
  for (int i = 0; i < options.attention_workers; ++i) {
    MOE_ASSIGN_OR_RETURN(int port, ports.Pick(false));
    d.roles.attention_workers.push_back({.rank = i, .address = absl::StrCat("127.0.0.1:", port)});
  }
  const int64_t slots = options.deployment.roles.expert_workers.empty()
                            ? 0
                            : options.deployment.roles.expert_workers.front().num_slots;
  d.roles.expert_workers.clear();
  for (int i = 0; i < options.expert_ranks; ++i) {
    // Data plane on the port, ExpertControl on the next one.
    MOE_ASSIGN_OR_RETURN(int port, ports.Pick(true));
    d.roles.expert_workers.push_back(
        {.rank = i, .address = absl::StrCat("127.0.0.1:", port), .num_slots = slots});
  }
  MOE_RETURN_IF_ERROR(config::Validate(d));

  char tmpl[] = "/tmp/moe-local-cluster.XXXXXX";
  if (mkdtemp(tmpl) == nullptr) {
    return absl::InternalError(absl::StrCat("mkdtemp: ", std::strerror(errno)));
  }
  const std::string dir = tmpl;
  const std::string config_path = dir + "/deployment.yaml";
  {
    std::ofstream f(config_path);
    f << "# Generated by moe-serve serve --local-cluster; every role reads it.\n" << config::ToYaml(d);
    if (!f) return absl::InternalError(absl::StrCat("cannot write ", config_path));
  }
  struct CleanDir {
    std::string dir;
    ~CleanDir() {
      std::error_code ec;
      fs::remove_all(dir, ec);
    }
  } clean{dir};

  std::error_code ec;
  std::string exe = fs::read_symlink("/proc/self/exe", ec).string();
  if (ec) return absl::InternalError("cannot find this executable (/proc/self/exe)");

  std::vector<std::unique_ptr<Role>> roles;
  auto add = [&](std::string name, std::vector<std::string> args, bool essential) {
    auto r = std::make_unique<Role>();
    r->name = std::move(name);
    r->args = std::move(args);
    r->essential = essential;
    roles.push_back(std::move(r));
  };
  std::vector<std::string> sched = {"scheduler", "--config", config_path};
  sched.insert(sched.end(), options.scheduler_args.begin(), options.scheduler_args.end());
  add("scheduler", sched, true);
  for (int i = 0; i < options.expert_ranks; ++i) {
    add(absl::StrCat("expert[", i, "]"),
        {"expert", "--config", config_path, "--rank", std::to_string(i)}, false);
  }
  for (int i = 0; i < options.attention_workers; ++i) {
    add(absl::StrCat("attention[", i, "]"),
        {"attention", "--config", config_path, "--rank", std::to_string(i)}, false);
  }
  add("frontend", {"frontend", "--config", config_path}, true);

  ports.Release();
  Supervisor sup(std::move(roles), signals);
  const absl::Duration grace = absl::Seconds(d.server.drain_timeout_s + 10);
  MOE_LOG(INFO) << "starting a local cluster" << common::Kv("attention_workers", options.attention_workers)
                << common::Kv("expert_ranks", options.expert_ranks)
                << common::Kv("redundant_slots", d.placement.redundant_slots)
                << common::Kv("config", config_path);
  for (auto& r : sup.roles()) {
    if (absl::Status s = Spawn(*r, exe, parent_mask); !s.ok()) {
      sup.StopAll(grace);
      return absl::InternalError(absl::StrCat("cannot start ", r->name, ": ", s.message()));
    }
    MOE_LOG(INFO) << "started " << r->name << common::Kv("pid", r->pid);
  }

  // Startup: every role up and the frontend healthy.
  const auto deadline =
      Clock::now() + std::chrono::milliseconds(static_cast<int64_t>(options.startup_timeout_s * 1000));
  while (true) {
    if (Role* gone = sup.Reap(); gone != nullptr) {
      const std::string what = absl::StrCat(gone->name, " ", DescribeExit(gone->wait_status),
                                            " during startup");
      sup.StopAll(grace);
      return absl::UnavailableError(absl::StrCat("the local cluster did not start: ", what));
    }
    if (HttpGetStatus(d.server.http_port, "/health") == 200) break;
    if (Clock::now() > deadline) {
      sup.StopAll(grace);
      return absl::DeadlineExceededError(absl::StrCat(
          "the local cluster did not become ready within ", options.startup_timeout_s,
          " s (see the roles' logs above; GET /v1/cluster tells which rank is missing)"));
    }
    const int sig = sup.WaitSignal(absl::Milliseconds(100));
    if (sig == SIGTERM || sig == SIGINT) {
      MOE_LOG(INFO) << "signal " << sig << " during startup: stopping the roles";
      sup.StopAll(grace);
      return absl::OkStatus();
    }
  }
  MOE_LOG(INFO) << "local cluster ready on http://127.0.0.1:" << d.server.http_port;

  absl::Status result;
  while (true) {
    const int sig = sup.WaitSignal(absl::Milliseconds(500));
    if (sig == SIGTERM || sig == SIGINT) {
      MOE_LOG(INFO) << "signal " << sig << ": stopping the roles";
      break;
    }
    Role* gone = sup.Reap();
    bool fatal = false;
    for (auto& r : sup.roles()) {
      if (r->exited && r->essential) {
        fatal = true;
        result = absl::UnavailableError(
            absl::StrCat(r->name, " ", DescribeExit(r->wait_status), "; the cluster stops"));
      }
    }
    if (fatal) break;
    (void)gone;
  }
  sup.StopAll(grace);
  MOE_LOG(INFO) << "stopped";
  return result;
}

}  // namespace moe::cli
