// The `mulfree.kernels._cpu` extension module: one registration call per kernel family.
#include "mulfree_cpu.h"

NB_MODULE(_cpu, m) {
  m.doc() = "mulfree CPU kernels (AVX-512 VNNI / AVX2 / scalar, chosen at run time)";
  register_cpuinfo(m);
  register_ternary(m);
  register_lmul(m);
  register_shiftadd(m);
  register_shiftadd_llama(m);
  register_hadamard(m);
  register_bcq_fit(m);
  register_gptq_columns(m);
  register_train_ops(m);
  register_grad_amx(m);
}
