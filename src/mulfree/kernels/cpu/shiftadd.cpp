// Kernel family 'shiftadd': implementation pending in this file.
#include "mulfree_cpu.h"

void register_shiftadd(nb::module_ &m) { (void)m; }
