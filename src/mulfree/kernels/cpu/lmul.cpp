// Kernel family 'lmul': implementation pending in this file.
#include "mulfree_cpu.h"

void register_lmul(nb::module_ &m) { (void)m; }
