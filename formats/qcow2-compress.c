/* qcow2: decompression of compressed clusters.
 *
 * Type 0 is raw deflate (no zlib header) with a 4 KiB window; type 1 is
 * one or more zstd frames with no length prefix.  Either way the input
 * may run on past the end of the stream, because the descriptor counts
 * whole sectors and the last one may be shared with the next cluster,
 * and the output must be exactly one cluster: anything shorter is an
 * error (QEMU block/qcow2-threads.c does the same).
 *
 * A context per call: compressed reads are the slow path, and this
 * keeps no state between threads.
 */
#include <config.h>

#include <errno.h>
#include <limits.h>

#include <zlib.h>
#include <zstd.h>

#include "qcow2.h"

static int
inflate_cluster (void *dst, size_t dst_size, const void *src,
                 size_t src_size)
{
  z_stream zs = { 0 };
  int r;

  if (src_size > UINT_MAX || dst_size > UINT_MAX)
    return -EIO;
  if (inflateInit2 (&zs, -12) != Z_OK)
    return -ENOMEM;
  zs.next_in = (Bytef *) src;
  zs.avail_in = src_size;
  zs.next_out = dst;
  zs.avail_out = dst_size;
  r = inflate (&zs, Z_FINISH);
  inflateEnd (&zs);
  /* Z_BUF_ERROR: the output filled up before the stream said it ended,
   * which is fine as long as it is full.
   */
  if ((r == Z_STREAM_END || r == Z_BUF_ERROR) && zs.avail_out == 0)
    return 0;
  return -EIO;
}

static int
zstd_cluster (void *dst, size_t dst_size, const void *src, size_t src_size)
{
  ZSTD_DCtx *dctx = ZSTD_createDCtx ();
  ZSTD_inBuffer in = { .src = src, .size = src_size, .pos = 0 };
  ZSTD_outBuffer out = { .dst = dst, .size = dst_size, .pos = 0 };
  int r = 0;

  if (dctx == NULL)
    return -ENOMEM;
  while (out.pos < out.size) {
    size_t in_before = in.pos, out_before = out.pos;
    size_t z = ZSTD_decompressStream (dctx, &out, &in);

    if (ZSTD_isError (z)) {
      r = -EIO;
      break;
    }
    /* No progress means truncated or garbage input: don't spin. */
    if (out.pos < out.size && in.pos == in_before && out.pos == out_before) {
      r = -EIO;
      break;
    }
  }
  ZSTD_freeDCtx (dctx);
  return r;
}

int
qcow2_decompress (uint8_t type, void *dst, size_t dst_size,
                  const void *src, size_t src_size)
{
  switch (type) {
  case QCOW2_COMPRESSION_ZLIB:
    return inflate_cluster (dst, dst_size, src, src_size);
  case QCOW2_COMPRESSION_ZSTD:
    return zstd_cluster (dst, dst_size, src, src_size);
  default:
    return -EIO;                /* refused at open */
  }
}
