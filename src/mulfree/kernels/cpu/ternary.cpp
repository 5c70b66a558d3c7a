// Kernel family 'ternary': implementation pending in this file.
#include "mulfree_cpu.h"

void register_ternary(nb::module_ &m) { (void)m; }
