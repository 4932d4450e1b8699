#include "worker/attention/attention_step.h"

#include <chrono>
#include <span>

#include "absl/strings/str_cat.h"

namespace moe::worker {

namespace pb = ::moe::internal::v1;

absl::StatusOr<StepOutput> AttentionStepRunner::Step(const StepInput& input) {
  Apply(input);
  return Compute(input);
}

void AttentionStepRunner::Apply(const StepInput& input) {
  for (SeqId id : input.freed_seq_ids) seqs_.erase(id);
  for (const StepInput::NewSequence& ns : input.new_sequences) {
    Sequence seq;
    seq.tokens = ns.prompt_token_ids;
    seq.tokens.insert(seq.tokens.end(), ns.output_token_ids.begin(), ns.output_token_ids.end());
    seq.sampler = std::make_unique<model::SequenceSampler>(ns.sampling, ns.prompt_token_ids,
                                                           ns.output_token_ids);
    seqs_[ns.seq_id] = std::move(seq);
  }
}

absl::StatusOr<StepOutput> AttentionStepRunner::Compute(const StepInput& input) {
  StepOutput output;
  output.step_id = input.step_id;
  if (input.chunks.empty()) return output;

  model::ForwardBatch batch;
  std::vector<Sequence*> refs;
  for (const StepInput::Chunk& c : input.chunks) {
    auto it = seqs_.find(c.seq_id);
    if (it == seqs_.end()) {
      return absl::InvalidArgumentError(absl::StrCat("chunk of unknown sequence ", c.seq_id));
    }
    Sequence& seq = it->second;
    const int64_t end = static_cast<int64_t>(c.start_position) + c.num_tokens;
    if (c.num_tokens <= 0 || c.start_position < 0 ||
        end > static_cast<int64_t>(seq.tokens.size()) ||
        (c.sample && end != static_cast<int64_t>(seq.tokens.size()))) {
      return absl::InvalidArgumentError(
          absl::StrCat("chunk of sequence ", c.seq_id, ": positions [", c.start_position, ", ",
                       end, ") do not fit its ", seq.tokens.size(), " tokens"));
    }
    batch.seqs.push_back(
        {.tokens = std::span<const int32_t>(seq.tokens).subspan(c.start_position, c.num_tokens),
         .start_position = c.start_position,
         .block_table = c.block_table,
         .logits = c.sample ? model::LogitsRows::kLast : model::LogitsRows::kNone});
    refs.push_back(&seq);
  }
  const auto t0 = std::chrono::steady_clock::now();
  MOE_ASSIGN_OR_RETURN(model::ForwardOutput out, model_.Forward(batch));
  output.forward_seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const int64_t vocab = out.logits.dim(1);
  for (size_t i = 0; i < input.chunks.size(); ++i) {
    const StepInput::Chunk& c = input.chunks[i];
    if (!c.sample) continue;
    const float* row = out.logits.data_as<float>() + int64_t{out.logits_offset[i]} * vocab;
    model::SampleOutput s = refs[i]->sampler->Sample(std::span<const float>(row, vocab));
    refs[i]->tokens.push_back(s.token);
    output.tokens.push_back({.seq_id = c.seq_id,
                             .token_id = s.token,
                             .logprob = s.logprob,
                             .top_logprobs = std::move(s.top_logprobs)});
  }
  return output;
}

// ---------------------------------------------------------------------------------------
// proto conversions

void ToProto(const StepInput& input, pb::StepRequest* out) {
  out->set_step_id(input.step_id);
  for (const StepInput::NewSequence& ns : input.new_sequences) {
    pb::NewSequence* p = out->add_new_sequences();
    p->set_seq_id(ns.seq_id);
    p->mutable_prompt_token_ids()->Add(ns.prompt_token_ids.begin(), ns.prompt_token_ids.end());
    p->mutable_output_token_ids()->Add(ns.output_token_ids.begin(), ns.output_token_ids.end());
    const model::SamplingOptions& s = ns.sampling;
    pb::SamplingOptions* ps = p->mutable_sampling();
    ps->set_temperature(s.temperature);
    ps->set_top_p(s.top_p);
    ps->set_top_k(s.top_k);
    ps->set_min_p(s.min_p);
    ps->set_presence_penalty(s.presence_penalty);
    ps->set_frequency_penalty(s.frequency_penalty);
    ps->set_repetition_penalty(s.repetition_penalty);
    ps->set_seed(s.seed);
    ps->set_top_logprobs(static_cast<uint32_t>(s.top_logprobs));
    ps->set_min_tokens(static_cast<uint32_t>(s.min_tokens));
    ps->mutable_min_tokens_blocked()->Add(s.min_tokens_blocked.begin(),
                                          s.min_tokens_blocked.end());
  }
  for (const StepInput::Chunk& c : input.chunks) {
    pb::ScheduledChunk* p = out->add_chunks();
    p->set_seq_id(c.seq_id);
    p->set_start_position(static_cast<uint32_t>(c.start_position));
    p->set_num_tokens(static_cast<uint32_t>(c.num_tokens));
    p->mutable_block_table()->Add(c.block_table.begin(), c.block_table.end());
    p->set_sample(c.sample);
  }
  out->mutable_freed_seq_ids()->Add(input.freed_seq_ids.begin(), input.freed_seq_ids.end());
}

absl::StatusOr<StepInput> FromProto(const pb::StepRequest& request) {
  StepInput input;
  input.step_id = request.step_id();
  for (const pb::NewSequence& p : request.new_sequences()) {
    StepInput::NewSequence ns;
    ns.seq_id = p.seq_id();
    ns.prompt_token_ids.assign(p.prompt_token_ids().begin(), p.prompt_token_ids().end());
    ns.output_token_ids.assign(p.output_token_ids().begin(), p.output_token_ids().end());
    if (ns.prompt_token_ids.empty()) {
      return absl::InvalidArgumentError(
          absl::StrCat("new_sequences.prompt_token_ids: sequence ", ns.seq_id, " has none"));
    }
    const pb::SamplingOptions& ps = p.sampling();
    model::SamplingOptions& s = ns.sampling;
    s.temperature = ps.temperature();
    s.top_p = ps.top_p();
    s.top_k = ps.top_k();
    s.min_p = ps.min_p();
    s.presence_penalty = ps.presence_penalty();
    s.frequency_penalty = ps.frequency_penalty();
    s.repetition_penalty = ps.repetition_penalty();
    s.seed = ps.seed();
    s.top_logprobs = static_cast<int>(ps.top_logprobs());
    s.min_tokens = static_cast<int>(ps.min_tokens());
    s.min_tokens_blocked.assign(ps.min_tokens_blocked().begin(), ps.min_tokens_blocked().end());
    MOE_RETURN_IF_ERROR(model::ValidateSamplingOptions(s));
    input.new_sequences.push_back(std::move(ns));
  }
  for (const pb::ScheduledChunk& p : request.chunks()) {
    if (p.start_position() > INT32_MAX || p.num_tokens() > INT32_MAX) {
      return absl::InvalidArgumentError(
          absl::StrCat("chunks: sequence ", p.seq_id(), " has positions beyond 2^31"));
    }
    input.chunks.push_back({.seq_id = p.seq_id(),
                            .start_position = static_cast<int32_t>(p.start_position()),
                            .num_tokens = static_cast<int32_t>(p.num_tokens()),
                            .block_table = {p.block_table().begin(), p.block_table().end()},
                            .sample = p.sample()});
  }
  input.freed_seq_ids.assign(request.freed_seq_ids().begin(), request.freed_seq_ids().end());
  return input;
}

void ToProto(const StepOutput& output, pb::StepResponse* out) {
  out->set_step_id(output.step_id);
  for (const StepOutput::Token& t : output.tokens) {
    pb::SampledToken* p = out->add_tokens();
    p->set_seq_id(t.seq_id);
    p->set_token_id(t.token_id);
    p->set_logprob(t.logprob);
    for (const model::CandidateLogprob& c : t.top_logprobs) {
      p->add_top_token_ids(c.token);
      p->add_top_logprobs(c.logprob);
    }
  }
  out->set_forward_seconds(output.forward_seconds);
  out->set_dispatch_seconds(output.dispatch_seconds);
  out->set_dispatch_bytes(output.dispatch_bytes);
}

absl::StatusOr<StepOutput> FromProto(const pb::StepResponse& response) {
  StepOutput output;
  output.step_id = response.step_id();
  for (const pb::SampledToken& p : response.tokens()) {
    if (p.top_token_ids_size() != p.top_logprobs_size()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "tokens.top_logprobs: sequence ", p.seq_id(), " has ", p.top_token_ids_size(),
          " ids and ", p.top_logprobs_size(), " logprobs"));
    }
    StepOutput::Token t{.seq_id = p.seq_id(), .token_id = p.token_id(), .logprob = p.logprob()};
    for (int i = 0; i < p.top_token_ids_size(); ++i) {
      t.top_logprobs.push_back({.token = p.top_token_ids(i), .logprob = p.top_logprobs(i)});
    }
    output.tokens.push_back(std::move(t));
  }
  output.forward_seconds = response.forward_seconds();
  output.dispatch_seconds = response.dispatch_seconds();
  output.dispatch_bytes = response.dispatch_bytes();
  return output;
}

}  // namespace moe::worker
