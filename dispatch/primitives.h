// The primitives behind the op functions in ops.h. eval_cpu runs the reference kernels in
// kernels/cpu; eval_gpu dispatches to the CUDA kernels (kernels/cuda, see cuda.h) when MLX runs on
// CUDA and to the Metal kernels (kernels/metal, see metal.h) on Apple GPUs.
#pragma once

#include <optional>

#include "mlx/primitives.h"

#include "ops.h"

namespace spqt {

// Inputs: x, w, scales, biases, then the active set (every kind but Dense, and but a Threshold
// given by value), the norm weight (RmsNorm prologue) and the residual (has_residual), in that order.
class ZigzagGemv : public mx::UnaryPrimitive {
 public:
  ZigzagGemv(
      mx::Stream stream,
      int group_size,
      int bits,
      ActiveKind kind,
      Prologue prologue = Prologue::Identity,
      float eps = 0.0f,
      bool has_residual = false,
      std::optional<float> threshold = std::nullopt)
      : mx::UnaryPrimitive(stream),
        group_size_(group_size),
        bits_(bits),
        kind_(kind),
        prologue_(prologue),
        eps_(eps),
        has_residual_(has_residual),
        threshold_(threshold) {}

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
    return std::make_tuple(group_size_, bits_, kind_, prologue_, eps_, has_residual_, threshold_);
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
  Prologue prologue() const {
    return prologue_;
  }
  float eps() const {
    return eps_;
  }
  // A scalar threshold passed by value (CUDA decode), instead of an input array.
  std::optional<float> threshold() const {
    return threshold_;
  }
  // Positions of the optional inputs, or -1.
  int active_input() const {
    return kind_ == ActiveKind::Dense || threshold_ ? -1 : 4;
  }
  int norm_input() const {
    return prologue_ == Prologue::RmsNorm ? 4 + (active_input() >= 0) : -1;
  }
  int residual_input() const {
    return has_residual_ ? 4 + (active_input() >= 0) + (prologue_ == Prologue::RmsNorm) : -1;
  }

 private:
  // The threshold of the Threshold kind as an array, whether an input or by value.
  mx::array threshold_array(const std::vector<mx::array>& inputs) const;
  std::vector<mx::array> fused_vjp(
      const std::vector<mx::array>& primals,
      const std::vector<mx::array>& cotangents,
      const std::vector<int>& argnums);

  int group_size_;
  int bits_;
  ActiveKind kind_;
  Prologue prologue_;
  float eps_;
  bool has_residual_;
  std::optional<float> threshold_;
};

// The experts' product of a mixture-of-experts layer (mlx-lm's SwitchLinear): row r of the output is
// x[r / (R / R_x)] @ W[experts[r]].T, each row over its own active columns when thresholded. Inputs:
// x (..., K) of R_x rows (2K columns with the SwiGLU prologue), w (E, bands, K, words), scales and
// biases (E, bands, K), experts (int32 or uint32, read as unsigned) of any shape with R entries, a
// multiple of R_x (consecutive rows share one row of x: the k experts of a token share its input);
// when `paired`, a second set of experts w2, scales2, biases2 (E, bands2, ...) whose rows follow
// the first's in each output row (gate and up in one launch); then with `sparse` the float32
// thresholds (E,), one per expert. Output experts.shape + (N,), N = (bands + bands2) * group_size.
// A row whose expert is not below E reads no weight and is 0.
class ZigzagGatherGemv : public mx::UnaryPrimitive {
 public:
  ZigzagGatherGemv(
      mx::Stream stream, int group_size, int bits, bool sparse, Prologue prologue = Prologue::Identity,
      bool paired = false)
      : mx::UnaryPrimitive(stream),
        group_size_(group_size),
        bits_(bits),
        sparse_(sparse),
        prologue_(prologue),
        paired_(paired) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;

  const char* name() const override {
    return "ZigzagGatherGemv";
  }
  bool is_equivalent(const mx::Primitive& other) const override;
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override;
  // The gradient with respect to x, as for ZigzagGemv.
  std::vector<mx::array> vjp(
      const std::vector<mx::array>& primals,
      const std::vector<mx::array>& cotangents,
      const std::vector<int>& argnums,
      const std::vector<mx::array>& outputs) override;
  auto state() const {
    return std::make_tuple(group_size_, bits_, sparse_, prologue_, paired_);
  }

  int group_size() const {
    return group_size_;
  }
  int bits() const {
    return bits_;
  }
  bool sparse() const {
    return sparse_;
  }
  Prologue prologue() const {
    return prologue_;
  }
  bool paired() const {
    return paired_;
  }
  // Positions of the optional inputs, or -1: the second experts' w (then scales, biases), the thresholds.
  int second_input() const {
    return paired_ ? 5 : -1;
  }
  int threshold_input() const {
    return sparse_ ? (paired_ ? 8 : 5) : -1;
  }

 private:
  int group_size_;
  int bits_;
  bool sparse_;
  Prologue prologue_;
  bool paired_;
};

// The dense product of many rows (prefill) on CUDA's tensor cores, read from the zigzag layout with
// no dequantized copy. Inputs: x (..., K), row-contiguous, float16 or bfloat16; w, scales, biases.
// Output x.shape[:-1] + (N,). zigzag_matmul creates it only where the CUDA kernel runs
// (cuda::matmul_runs); elsewhere it composes MLX ops, so eval_cpu is never reached.
class ZigzagMatmul : public mx::UnaryPrimitive {
 public:
  ZigzagMatmul(mx::Stream stream, int group_size, int bits)
      : mx::UnaryPrimitive(stream), group_size_(group_size), bits_(bits) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;

  const char* name() const override {
    return "ZigzagMatmul";
  }
  bool is_equivalent(const mx::Primitive& other) const override;
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override;
  // The gradient with respect to x, as for ZigzagGemv.
  std::vector<mx::array> vjp(
      const std::vector<mx::array>& primals,
      const std::vector<mx::array>& cotangents,
      const std::vector<int>& argnums,
      const std::vector<mx::array>& outputs) override;
  auto state() const {
    return std::make_tuple(group_size_, bits_);
  }

  int group_size() const {
    return group_size_;
  }
  int bits() const {
    return bits_;
  }

 private:
  int group_size_;
  int bits_;
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
