// AttentionStepRunner: the step logic of an attention worker, shared by the worker inside
// the frontend's process (server::InProcessAttentionWorker) and the attention worker role
// (AttentionServer, attention_service.h), so both compute and sample exactly alike.
//
// One step (StepInput, shaped like internal.proto's StepRequest): drop the freed sequences,
// register the new ones (their prompt, tokens generated before, sampling options: sent
// once), then run the chunks through Model::Forward and sample where a chunk asks. The runner
// keeps each sequence's tokens (prompt + outputs) and its SequenceSampler; only token ids
// and logprobs go back (StepOutput).
//
// Split form: Apply() (frees and new sequences) then Compute() (forward and sampling).
// Compute changes nothing but the KV cache until the forward succeeded, so a caller may call
// it again for the same input after a failure that it can repair (e.g. a stale expert
// placement: refetch it, compute again); the cache rows it writes are the same.
//
// Also here: the conversions between StepInput/StepOutput and the proto messages, used by
// the gRPC client (server/remote_attention_worker.h) and the service.
//
// Threads: not thread-safe; one caller at a time (the Model is not reentrant).
//
//   AttentionStepRunner runner(*model);
//   MOE_ASSIGN_OR_RETURN(StepOutput out, runner.Step(input));
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <vector>

#include "common/status.h"
#include "model/model.h"
#include "model/sampler.h"
#include "moe/v1/internal.pb.h"

namespace moe::worker {

using SeqId = uint64_t;

struct StepInput {
  struct NewSequence {
    SeqId seq_id = 0;
    std::vector<int32_t> prompt_token_ids;
    // Tokens generated before (a sequence replayed on another worker); empty otherwise.
    std::vector<int32_t> output_token_ids;
    model::SamplingOptions sampling;
  };
  struct Chunk {
    SeqId seq_id = 0;
    int32_t start_position = 0;  // of the sequence's tokens (prompt + outputs)
    int32_t num_tokens = 0;
    std::vector<int32_t> block_table;  // covers start_position + num_tokens
    bool sample = false;
  };
  uint64_t step_id = 0;
  std::vector<NewSequence> new_sequences;
  std::vector<Chunk> chunks;
  std::vector<SeqId> freed_seq_ids;  // finished sequences: drop their state
};

struct StepOutput {
  struct Token {
    SeqId seq_id = 0;
    int32_t token_id = 0;
    float logprob = 0.0f;
    std::vector<model::CandidateLogprob> top_logprobs;
  };
  uint64_t step_id = 0;
  std::vector<Token> tokens;  // one per chunk with sample, in chunk order
  double forward_seconds = 0.0;
  // Of forward_seconds, the time spent dispatching to and waiting on expert ranks (0 when
  // the experts are local), and the bytes those dispatches and combines moved.
  double dispatch_seconds = 0.0;
  uint64_t dispatch_bytes = 0;
};

class AttentionStepRunner {
 public:
  // `model` is not owned and must outlive the runner.
  explicit AttentionStepRunner(model::Model& model) : model_(model) {}

  // Apply + Compute.
  absl::StatusOr<StepOutput> Step(const StepInput& input);
  // Drops the freed sequences and registers the new ones (a known id is replaced).
  void Apply(const StepInput& input);
  // Forward over the chunks and sampling. InvalidArgument for a chunk of an unknown
  // sequence or positions that do not fit its tokens; model and executor errors pass
  // through (no token is sampled then).
  absl::StatusOr<StepOutput> Compute(const StepInput& input);

  int num_sequences() const { return static_cast<int>(seqs_.size()); }

 private:
  struct Sequence {
    std::vector<int32_t> tokens;  // prompt + outputs
    std::unique_ptr<model::SequenceSampler> sampler;
  };
  model::Model& model_;
  std::map<SeqId, Sequence> seqs_;
};

// ---- proto conversions (moe.internal.v1.StepRequest / StepResponse) ----

void ToProto(const StepInput& input, ::moe::internal::v1::StepRequest* out);
// InvalidArgument naming the field for values the engine never sends (negative positions).
absl::StatusOr<StepInput> FromProto(const ::moe::internal::v1::StepRequest& request);
void ToProto(const StepOutput& output, ::moe::internal::v1::StepResponse* out);
absl::StatusOr<StepOutput> FromProto(const ::moe::internal::v1::StepResponse& response);

}  // namespace moe::worker
