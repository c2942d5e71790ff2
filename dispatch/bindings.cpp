// Python bindings of the op functions. The public Python API (spqt_mlx/ops.py) wraps these.
#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/variant.h>
#include <nanobind/stl/vector.h>

#include "ops.h"

namespace nb = nanobind;
namespace mx = mlx::core;
using namespace nb::literals;

NB_MODULE(_ext, m) {
  m.doc() = "spqt_mlx C++ ops: zigzag GEMV and active-column collection.";

  nb::enum_<spqt::ActiveKind>(m, "ActiveKind", "How the active input columns of a zigzag GEMV are given.")
      .value("Dense", spqt::ActiveKind::Dense, "every column")
      .value("Indices", spqt::ActiveKind::Indices, "an integer list of column indices")
      .value("Packed", spqt::ActiveKind::Packed, "a count-prefixed int32 list [n, idx...] of length K + 1")
      .value("Threshold", spqt::ActiveKind::Threshold, "columns with |x| > threshold, collected in the kernel");
  nb::enum_<spqt::Prologue>(m, "Prologue", "What a fused zigzag GEMV does to x before the product.")
      .value("Identity", spqt::Prologue::Identity, "x itself")
      .value("RmsNorm", spqt::Prologue::RmsNorm, "x * rsqrt(mean(x^2) + eps) * norm_weight, per row")
      .value("SwiGLU", spqt::Prologue::SwiGLU, "silu(x[..., :K]) * x[..., K:]");
  m.attr("SUPPORTED_BITS") = nb::tuple(nb::cast(std::vector<int>(std::begin(spqt::kSupportedBits),
                                                                 std::end(spqt::kSupportedBits))));
  m.attr("SUPPORTED_GROUP_SIZES") = nb::tuple(nb::cast(std::vector<int>(
      std::begin(spqt::kSupportedGroupSizes), std::end(spqt::kSupportedGroupSizes))));

  m.def(
      "zigzag_gemv",
      [](const mx::array& x,
         const mx::array& w,
         const mx::array& scales,
         const mx::array& biases,
         const std::optional<mx::array>& active,
         spqt::ActiveKind kind,
         int group_size,
         int bits,
         spqt::Prologue prologue,
         const std::optional<mx::array>& norm_weight,
         float eps,
         const std::optional<mx::array>& residual,
         mx::StreamOrDevice s) {
        if (kind != spqt::ActiveKind::Dense && !active) {
          throw std::invalid_argument("[zigzag_gemv] this kind of active set needs an array.");
        }
        return spqt::zigzag_gemv(
            x, w, scales, biases, active, kind, group_size, bits, {prologue, norm_weight, eps, residual}, s);
      },
      "x"_a,
      "w"_a,
      "scales"_a,
      "biases"_a,
      "active"_a.none(),
      "kind"_a,
      "group_size"_a,
      "bits"_a,
      // A fused product: a prologue on x and a residual added to y (kernels/contract.h).
      "prologue"_a = spqt::Prologue::Identity,
      "norm_weight"_a = nb::none(),
      "eps"_a = 0.0f,
      "residual"_a = nb::none(),
      nb::kw_only(),
      "stream"_a = nb::none());

  m.def(
      "zigzag_gather_gemv",
      [](const mx::array& x,
         const mx::array& w,
         const mx::array& scales,
         const mx::array& biases,
         const mx::array& experts,
         const std::optional<mx::array>& threshold,
         int group_size,
         int bits,
         spqt::Prologue prologue,
         const std::optional<mx::array>& w2,
         const std::optional<mx::array>& scales2,
         const std::optional<mx::array>& biases2,
         mx::StreamOrDevice s) {
        std::optional<spqt::SecondExperts> second;
        if (w2 || scales2 || biases2) {
          if (!(w2 && scales2 && biases2)) {
            throw std::invalid_argument("[zigzag_gather_gemv] second experts need w2, scales2 and biases2.");
          }
          second = spqt::SecondExperts{*w2, *scales2, *biases2};
        }
        return spqt::zigzag_gather_gemv(x, w, scales, biases, experts, threshold, group_size, bits, prologue, second, s);
      },
      "x"_a,
      "w"_a,
      "scales"_a,
      "biases"_a,
      "experts"_a,
      "threshold"_a.none(),
      "group_size"_a,
      "bits"_a,
      // SwiGLU on x first; a second set of experts whose rows follow the first's (gate and up at once).
      "prologue"_a = spqt::Prologue::Identity,
      "w2"_a = nb::none(),
      "scales2"_a = nb::none(),
      "biases2"_a = nb::none(),
      nb::kw_only(),
      "stream"_a = nb::none());

  m.def(
      "zigzag_matmul",
      &spqt::zigzag_matmul,
      "x"_a,
      "w"_a,
      "scales"_a,
      "biases"_a,
      "group_size"_a,
      "bits"_a,
      nb::kw_only(),
      "stream"_a = nb::none());

  m.def(
      "apply_prologue",
      &spqt::apply_prologue,
      "x"_a,
      "prologue"_a,
      "norm_weight"_a = nb::none(),
      "eps"_a = 0.0f,
      nb::kw_only(),
      "stream"_a = nb::none());

  m.def(
      "collect_active",
      &spqt::collect_active,
      "x"_a,
      "threshold"_a,
      nb::kw_only(),
      "stream"_a = nb::none());

  m.def("check_collect_active", &spqt::check_collect_active, "x"_a, "threshold"_a);
  // Whether an array holds computed data already: checks that would evaluate a lazy array (and so
  // materialize a model that was meant to stay lazy) run only on arrays for which this is true.
  m.def("is_evaluated", [](const mx::array& a) { return a.is_available(); }, "a"_a);
}
