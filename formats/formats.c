/* The table of node drivers. */
#include <config.h>

#include <stdlib.h>
#include <string.h>

#include "driver.h"

extern const struct node_driver file_driver;
extern const struct node_driver raw_driver;
extern const struct node_driver qcow2_driver;
extern const struct node_driver nbd_driver;

static const struct node_driver *const drivers[] = {
  &file_driver,
  &raw_driver,
  &qcow2_driver,
  &nbd_driver,
};

const struct node_driver *
format_find_driver (const char *name)
{
  for (size_t i = 0; i < sizeof drivers / sizeof drivers[0]; ++i)
    if (strcmp (drivers[i]->name, name) == 0)
      return drivers[i];
  return NULL;
}

const char *
format_driver_names (void)
{
  return "file, raw, qcow2";
}

void
node_bitmap_infos_free (struct node_bitmap_info *list, size_t n)
{
  for (size_t i = 0; i < n; ++i)
    free (list[i].name);
  free (list);
}
