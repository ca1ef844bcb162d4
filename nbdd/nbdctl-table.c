/* nbdctl: aligned tables and human-readable sizes for its output, and
 * escaping of the text it prints for people.
 *
 * Names, descriptions and file names come from the daemon, which
 * takes them from whoever added the export or node: a name holding
 * ESC [ 2 J, a newline or a right-to-left override would rewrite the
 * administrator's terminal or the table.  So everything printed for
 * people goes through escape_text; --json output is JSON's own
 * escaping.
 */
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

/* The length of the valid UTF-8 sequence at @p (2 to 4), or 0 if
 * there is none: an ASCII byte, a stray or overlong byte, a surrogate
 * or a code point past U+10FFFF.
 */
static size_t
utf8_len (const unsigned char *p)
{
  unsigned char lo = 0x80, hi = 0xbf;
  size_t n;

  if (p[0] >= 0xc2 && p[0] <= 0xdf)
    n = 2;
  else if (p[0] >= 0xe0 && p[0] <= 0xef) {
    n = 3;
    if (p[0] == 0xe0)
      lo = 0xa0;                /* overlong */
    else if (p[0] == 0xed)
      hi = 0x9f;                /* surrogates */
  }
  else if (p[0] >= 0xf0 && p[0] <= 0xf4) {
    n = 4;
    if (p[0] == 0xf0)
      lo = 0x90;                /* overlong */
    else if (p[0] == 0xf4)
      hi = 0x8f;                /* past U+10FFFF */
  }
  else
    return 0;
  if (p[1] < lo || p[1] > hi)
    return 0;
  for (size_t i = 2; i < n; ++i)
    if (p[i] < 0x80 || p[i] > 0xbf)    /* also stops at the NUL */
      return 0;
  return n;
}

/* Valid UTF-8 that terminals still act on: C1 controls (U+0080 to
 * U+009F; U+009B is CSI) and the bidirectional embeddings, overrides
 * and isolates (U+202A to U+202E, U+2066 to U+2069).
 */
static bool
is_unicode_control (const unsigned char *p, size_t n)
{
  if (n == 2)
    return p[0] == 0xc2 && p[1] <= 0x9f;
  if (n == 3 && p[0] == 0xe2)
    return (p[1] == 0x80 && p[2] >= 0xaa && p[2] <= 0xae) ||
      (p[1] == 0x81 && p[2] >= 0xa6 && p[2] <= 0xa9);
  return false;
}

char *
escape_text (const char *s)
{
  const unsigned char *p = (const unsigned char *) s;
  char *r = NULL;
  size_t len = 0;
  FILE *fp = check_alloc (open_memstream (&r, &len));

  while (*p) {
    size_t n = *p >= 0x80 ? utf8_len (p) : 0;

    if (n > 0 && !is_unicode_control (p, n)) {
      fwrite (p, 1, n, fp);
      p += n;
      continue;
    }
    for (size_t i = 0; i < MAX (n, (size_t) 1); ++i, ++p) {
      switch (*p) {
      case '\n': fputs ("\\n", fp); break;
      case '\t': fputs ("\\t", fp); break;
      case '\r': fputs ("\\r", fp); break;
      case '\\': fputs ("\\\\", fp); break;
      default:
        if (*p < 0x20 || *p >= 0x7f)
          fprintf (fp, "\\x%02x", *p);
        else
          fputc (*p, fp);
      }
    }
  }
  if (fclose (fp) != 0)
    out_of_memory ();
  return r;
}

/* Columns that escaped text @s takes: one per character, which is
 * right for ASCII and most scripts (East Asian wide characters take
 * two, and are counted as one).
 */
static size_t
text_width (const char *s)
{
  size_t w = 0;

  for (; *s; ++s)
    if (((unsigned char) *s & 0xc0) != 0x80)  /* not a continuation */
      w++;
  return w;
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
    cells[t->nrows * n + i] = escape_text (row[i] && *row[i] ? row[i] : "-");
  t->nrows++;
}

static void
print_cell (FILE *fp, const char *s, size_t width, char align, bool last)
{
  size_t len = text_width (s);
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
    width[c] = text_width (t->headers[c]);
    for (size_t r = 0; r < t->nrows; ++r)
      width[c] = MAX (width[c], text_width (t->cells[r * t->ncols + c]));
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
