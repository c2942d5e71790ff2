// The primitives behind the op functions in ops.h. eval_cpu runs the reference kernels in
// kernels/cpu; eval_gpu dispatches to the CUDA kernels (kernels/cuda, see cuda.h) when MLX runs on
// CUDA and to the Metal kernels (kernels/metal, see metal.h) on Apple GPUs.
#pragma once

#include "mlx/primitives.h"

#include "ops.h"

namespace spqt {

class ZigzagGemv : public mx::UnaryPrimitive {
 public:
  ZigzagGemv(mx::Stream stream, int group_size, int bits, ActiveKind kind)
      : mx::UnaryPrimitive(stream),
        group_size_(group_size),
        bits_(bits),
        kind_(kind) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;

  const char* name() const override {
    return "ZigzagGemv";
  }
  bool is_equivalent(const mx::Primitive& other) const override;
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override;
  // The gradient with respect to x (what LoRA and other training over a frozen quantized model
  // need); the quantized weight itself is not differentiable, as in MLX's quantized matmul.
  std::vector<mx::array> vjp(
      const std::vector<mx::array>& primals,
      const std::vector<mx::array>& cotangents,
      const std::vector<int>& argnums,
      const std::vector<mx::array>& outputs) override;
  auto state() const {
    return std::make_tuple(group_size_, bits_, kind_);
  }

  int group_size() const {
    return group_size_;
  }
  int bits() const {
    return bits_;
  }
  ActiveKind kind() const {
    return kind_;
  }

 private:
  int group_size_;
  int bits_;
  ActiveKind kind_;
};

class CollectActive : public mx::UnaryPrimitive {
 public:
  explicit CollectActive(mx::Stream stream) : mx::UnaryPrimitive(stream) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;

  const char* name() const override {
    return "CollectActive";
  }
  bool is_equivalent(const mx::Primitive& other) const override {
    return dynamic_cast<const CollectActive*>(&other) != nullptr;
  }
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override;
};

} // namespace spqt
