/* libFuzzer target: the qcow2 header parser.
 *
 * Each input is the start of a would-be qcow2 file: the header,
 * extensions and backing name in cluster 0.  The parser must reject
 * garbage with an error, never read out of bounds, leak or trip UBSan.
 * The input's length doubles as the file size, so the "inside the
 * file" checks are exercised too.
 */
#include <config.h>

#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

#include "qcow2.h"

int LLVMFuzzerTestOneInput (const uint8_t *data, size_t size);

int
LLVMFuzzerTestOneInput (const uint8_t *data, size_t size)
{
  struct qcow2_info info;
  struct error *err = NULL;

  if (qcow2_header_parse (data, size, size, &info, &err) == 0) {
    char *names = qcow2_feature_names (&info, 0, info.incompat);
    free (names);
    qcow2_info_free (&info);
  }
  else
    error_free (err);
  return 0;
}
