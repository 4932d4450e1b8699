// The generated protocol code links and round-trips through the wire format.
#include "gtest/gtest.h"
#include "moe/v1/internal.pb.h"
#include "moe/v1/serving.grpc.pb.h"
#include "moe/v1/serving.pb.h"

namespace {

TEST(ProtoTest, PlacementTableRoundTrips) {
  moe::internal::v1::PlacementTable table;
  table.set_epoch(3);
  auto* layer = table.add_layers();
  layer->set_layer(1);
  auto* expert = layer->add_experts();
  expert->set_expert(5);
  auto* replica = expert->add_replicas();
  replica->set_rank(2);
  replica->set_slot(7);
  std::string wire = table.SerializeAsString();
  moe::internal::v1::PlacementTable parsed;
  ASSERT_TRUE(parsed.ParseFromString(wire));
  EXPECT_EQ(parsed.epoch(), 3u);
  EXPECT_EQ(parsed.layers(0).experts(0).replicas(0).slot(), 7);
}

TEST(ProtoTest, GenerateRequestOneofAndServiceName) {
  moe::v1::GenerateRequest req;
  req.mutable_token_ids()->add_ids(42);
  EXPECT_EQ(req.prompt_case(), moe::v1::GenerateRequest::kTokenIds);
  req.set_text("hello");
  EXPECT_EQ(req.prompt_case(), moe::v1::GenerateRequest::kText);
  EXPECT_STREQ(moe::v1::MoeServe::service_full_name(), "moe.v1.MoeServe");
}

TEST(ProtoTest, GarbageDoesNotParse) {
  moe::internal::v1::PlacementTable parsed;
  EXPECT_FALSE(parsed.ParseFromString(std::string("\xff\xff\xff\xff\x0f", 5)));
}

}  // namespace
