/* The table of node drivers. */
#include <config.h>

#include <string.h>

#include "driver.h"

extern const struct node_driver file_driver;
extern const struct node_driver raw_driver;
extern const struct node_driver qcow2_driver;

static const struct node_driver *const drivers[] = {
  &file_driver,
  &raw_driver,
  &qcow2_driver,
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
