/* nbdctl: aligned tables and human-readable sizes for its output. */
#include <config.h>

#include <assert.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "nbdctl.h"
#include "utils.h"

void
table_init (struct table *t, const char *const *headers, const char *align)
{
  size_t n = 0;

  while (headers[n])
    n++;
  *t = (struct table) { .ncols = n, .headers = headers, .align = align };
}

void
table_add (struct table *t, const char *const *row, size_t n)
{
  char **cells;

  assert (n == t->ncols);       /* our tables, not the daemon's data */
  cells = check_alloc (reallocarray (t->cells, (t->nrows + 1) * t->ncols,
                                    sizeof *cells));
  t->cells = cells;
  for (size_t i = 0; i < n; ++i)
    cells[t->nrows * n + i] = check_alloc (strdup (row[i] && *row[i]
                                                   ? row[i] : "-"));
  t->nrows++;
}

static void
print_cell (FILE *fp, const char *s, size_t width, char align, bool last)
{
  size_t len = strlen (s);
  size_t pad = width > len ? width - len : 0;

  if (align == 'r')
    fprintf (fp, "%*s%s", (int) pad, "", s);
  else if (last)
    fputs (s, fp);              /* no trailing blanks */
  else
    fprintf (fp, "%s%*s", s, (int) pad, "");
  fputs (last ? "\n" : "  ", fp);
}

void
table_print (const struct table *t, FILE *fp)
{
  size_t *width = check_alloc (calloc (t->ncols, sizeof *width));

  for (size_t c = 0; c < t->ncols; ++c) {
    width[c] = strlen (t->headers[c]);
    for (size_t r = 0; r < t->nrows; ++r)
      width[c] = MAX (width[c], strlen (t->cells[r * t->ncols + c]));
  }
  for (size_t c = 0; c < t->ncols; ++c)
    print_cell (fp, t->headers[c], width[c], t->align[c], c + 1 == t->ncols);
  for (size_t r = 0; r < t->nrows; ++r)
    for (size_t c = 0; c < t->ncols; ++c)
      print_cell (fp, t->cells[r * t->ncols + c], width[c], t->align[c],
                  c + 1 == t->ncols);
  free (width);
}

void
table_free (struct table *t)
{
  for (size_t i = 0; i < t->nrows * t->ncols; ++i)
    free (t->cells[i]);
  free (t->cells);
  t->cells = NULL;
  t->nrows = 0;
}

void
human_size (uint64_t v, char *buf, size_t len)
{
  static const char units[] = "KMGTPE";
  unsigned u = 0;
  double d;

  if (v < 1024) {
    snprintf (buf, len, "%" PRIu64, v);
    return;
  }
  d = v / 1024.0;
  while (d >= 1024 && u + 1 < sizeof units - 1) {
    d /= 1024;
    u++;
  }
  /* One decimal below 10 unless it is a whole number: 1.5G, 10G, 64K. */
  if (d < 10 && d != (uint64_t) d)
    snprintf (buf, len, "%.1f%c", d, units[u]);
  else
    snprintf (buf, len, "%.0f%c", d, units[u]);
}
