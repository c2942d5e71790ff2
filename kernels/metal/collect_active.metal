// Kernel instantiations of collect_active.h, one per activation type.
#include "collect_active.h"

instantiate_kernel("collect_active_float32", collect_active, float)
instantiate_kernel("collect_active_float16", collect_active, half)
instantiate_kernel("collect_active_bfloat16", collect_active, bfloat)
