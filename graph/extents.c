/* Extent lists, filled by block_status. */
#include <config.h>

#include <errno.h>
#include <stdlib.h>

#include "driver.h"

void
extents_init (struct extent_list *el, uint64_t offset, size_t max)
{
  el->offset = el->end = offset;
  el->v = NULL;
  el->len = el->cap = 0;
  el->max = max ? max : 1;
}

void
extents_reset (struct extent_list *el, uint64_t offset)
{
  el->offset = el->end = offset;
  el->len = 0;
}

void
extents_free (struct extent_list *el)
{
  free (el->v);
  el->v = NULL;
  el->len = el->cap = 0;
}

int
extents_add (struct extent_list *el, uint64_t length, uint32_t flags)
{
  if (length == 0)
    return 0;
  if (el->len > 0 && el->v[el->len - 1].flags == flags) {
    el->v[el->len - 1].length += length;
    el->end += length;
    return 0;
  }
  if (el->len >= el->max)
    return 1;
  if (el->len == el->cap) {
    size_t ncap = el->cap ? el->cap * 2 : 16;
    struct extent *nv = realloc (el->v, ncap * sizeof *nv);
    if (nv == NULL)
      return -ENOMEM;
    el->v = nv;
    el->cap = ncap;
  }
  el->v[el->len].length = length;
  el->v[el->len].flags = flags;
  el->len++;
  el->end += length;
  return 0;
}
