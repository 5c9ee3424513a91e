// The codes of the contrastive ops' `int loss, int direction, int reduction` schema arguments, for
// the CPU and CUDA code alike. They are the positions of the names in mmfast/ops/contrastive.py's
// LOSSES, DIRECTIONS and REDUCTIONS (the Python side's one definition; tests/test_structure.py
// checks that the two agree).
#pragma once

namespace mmfast {
namespace contrastive {

enum Loss { kInfoNCE = 0, kSigLIP = 1 };
enum Direction { kBoth = 0, kImage = 1, kText = 2 };
enum Reduction { kMean = 0, kSum = 1, kNone = 2 };

}  // namespace contrastive
}  // namespace mmfast
