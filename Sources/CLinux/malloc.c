/* See fl_malloc.h. */
#include "fl_malloc.h"
#include <malloc.h>

int fl_malloc_single_arena(void) { return mallopt(M_ARENA_MAX, 1); }
