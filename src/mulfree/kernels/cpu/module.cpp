// The `mulfree.kernels._cpu` extension module: one registration call per kernel family.
#include "mulfree_cpu.h"

NB_MODULE(_cpu, m) {
  m.doc() = "mulfree CPU kernels (AVX-512 VNNI / AVX2 / scalar, chosen at run time)";
  // An engine still referenced when the interpreter exits (a command that ends with an error after loading a
  // model) is freed by the process exit; nanobind's report of it would follow the one-line error on stderr.
  nb::set_leak_warnings(false);
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
