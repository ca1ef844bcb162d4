/* The qcow2 on-disk format, from QEMU's docs/interop/qcow2.txt.
 *
 * Only facts about the bytes on disk live here (magic numbers, field
 * offsets, bit masks, and the limits QEMU enforces when it opens an
 * image, since an image QEMU refuses is no use to anyone), so that the
 * reader and the image creator share one definition.  All fields are
 * big-endian.
 */
#ifndef NBDD_QCOW2_FORMAT_H
#define NBDD_QCOW2_FORMAT_H

#include <stdint.h>

#define QCOW2_MAGIC             UINT32_C (0x514649fb)   /* "QFI\xfb" */

/* Header field offsets.  A version 2 header ends at 72 bytes; version 3
 * adds the fields up to header_length (at least 104 bytes, a multiple
 * of 8).  QEMU writes 112: compression_type and its padding.
 */
#define QCOW2_HDR_MAGIC                 0   /* u32 */
#define QCOW2_HDR_VERSION               4   /* u32: 2 or 3 */
#define QCOW2_HDR_BACKING_FILE_OFFSET   8   /* u64: 0 = no backing file */
#define QCOW2_HDR_BACKING_FILE_SIZE    16   /* u32: <= 1023, no NUL */
#define QCOW2_HDR_CLUSTER_BITS         20   /* u32 */
#define QCOW2_HDR_SIZE                 24   /* u64: virtual size, bytes */
#define QCOW2_HDR_CRYPT_METHOD         32   /* u32 */
#define QCOW2_HDR_L1_SIZE              36   /* u32: entries */
#define QCOW2_HDR_L1_TABLE_OFFSET      40   /* u64 */
#define QCOW2_HDR_REFCOUNT_TABLE_OFFSET 48  /* u64 */
#define QCOW2_HDR_REFCOUNT_TABLE_CLUSTERS 56 /* u32 */
#define QCOW2_HDR_NB_SNAPSHOTS         60   /* u32 */
#define QCOW2_HDR_SNAPSHOTS_OFFSET     64   /* u64 */
#define QCOW2_HDR_V2_LENGTH            72
#define QCOW2_HDR_INCOMPAT_FEATURES    72   /* u64, v3 */
#define QCOW2_HDR_COMPAT_FEATURES      80   /* u64, v3 */
#define QCOW2_HDR_AUTOCLEAR_FEATURES   88   /* u64, v3 */
#define QCOW2_HDR_REFCOUNT_ORDER       96   /* u32, v3 (v2: always 4) */
#define QCOW2_HDR_HEADER_LENGTH       100   /* u32, v3 */
#define QCOW2_HDR_V3_MIN_LENGTH       104
#define QCOW2_HDR_COMPRESSION_TYPE    104   /* u8, if header_length > 104 */
#define QCOW2_HDR_V3_LENGTH           112   /* what QEMU writes */

/* crypt_method */
#define QCOW2_CRYPT_NONE                0
#define QCOW2_CRYPT_AES                 1
#define QCOW2_CRYPT_LUKS                2

/* compression_type */
#define QCOW2_COMPRESSION_ZLIB          0   /* raw deflate */
#define QCOW2_COMPRESSION_ZSTD          1

/* Feature bits: bit numbers, as the feature name table names them. */
#define QCOW2_INCOMPAT_DIRTY_BITNR      0
#define QCOW2_INCOMPAT_CORRUPT_BITNR    1
#define QCOW2_INCOMPAT_DATA_FILE_BITNR  2
#define QCOW2_INCOMPAT_COMPRESSION_BITNR 3
#define QCOW2_INCOMPAT_EXTL2_BITNR      4
#define QCOW2_COMPAT_LAZY_REFCOUNTS_BITNR 0
#define QCOW2_AUTOCLEAR_BITMAPS_BITNR   0
#define QCOW2_AUTOCLEAR_DATA_FILE_RAW_BITNR 1

#define QCOW2_INCOMPAT_DIRTY        (UINT64_C (1) << 0)
#define QCOW2_INCOMPAT_CORRUPT      (UINT64_C (1) << 1)
#define QCOW2_INCOMPAT_DATA_FILE    (UINT64_C (1) << 2)
#define QCOW2_INCOMPAT_COMPRESSION  (UINT64_C (1) << 3)
#define QCOW2_INCOMPAT_EXTL2        (UINT64_C (1) << 4)
#define QCOW2_INCOMPAT_MASK         (UINT64_C (0x1f))   /* bits 0-4 defined */
#define QCOW2_COMPAT_LAZY_REFCOUNTS \
  (UINT64_C (1) << QCOW2_COMPAT_LAZY_REFCOUNTS_BITNR)
#define QCOW2_AUTOCLEAR_BITMAPS \
  (UINT64_C (1) << QCOW2_AUTOCLEAR_BITMAPS_BITNR)
#define QCOW2_AUTOCLEAR_DATA_FILE_RAW \
  (UINT64_C (1) << QCOW2_AUTOCLEAR_DATA_FILE_RAW_BITNR)

/* Header extensions: u32 type, u32 length, data padded to 8 bytes.
 * They follow the header; type 0 ends the list.  The backing file name
 * (not NUL-terminated) sits after the list, inside cluster 0.
 */
#define QCOW2_EXT_END                   UINT32_C (0x00000000)
#define QCOW2_EXT_BACKING_FORMAT        UINT32_C (0xe2792aca)
#define QCOW2_EXT_FEATURE_TABLE         UINT32_C (0x6803f857)
#define QCOW2_EXT_BITMAPS               UINT32_C (0x23852875)
#define QCOW2_EXT_CRYPTO_HEADER         UINT32_C (0x0537be77)
#define QCOW2_EXT_DATA_FILE             UINT32_C (0x44415441)
#define QCOW2_EXT_HEADER_SIZE           8

/* Feature name table entry: u8 type, u8 bit, char name[46]. */
#define QCOW2_FEAT_TYPE_INCOMPATIBLE    0
#define QCOW2_FEAT_TYPE_COMPATIBLE      1
#define QCOW2_FEAT_TYPE_AUTOCLEAR       2
#define QCOW2_FEAT_ENTRY_SIZE           48
#define QCOW2_FEAT_NAME_SIZE            46

#define QCOW2_MAX_BACKING_FILE_NAME     1023

/* Cluster sizes: 512 B (spec minimum) to 2 MiB (QEMU's limit).
 * Extended L2 entries need at least 16 KiB: 32 subclusters of 512 B.
 */
#define QCOW2_MIN_CLUSTER_BITS          9
#define QCOW2_MAX_CLUSTER_BITS          21
#define QCOW2_EXTL2_SUBCLUSTERS         32
#define QCOW2_EXTL2_MIN_CLUSTER_BITS    14

/* refcount_order: refcount_bits = 1 << order, at most 64 bits. */
#define QCOW2_MAX_REFCOUNT_ORDER        6

/* QEMU's implementation limits (block/qcow2.h), which bound the virtual
 * size (through the L1 table) and the host file (through the refcount
 * table) of any image QEMU will open.
 */
#define QCOW2_MAX_L1_SIZE               (UINT64_C (32) << 20)   /* bytes */
#define QCOW2_MAX_REFTABLE_SIZE         (UINT64_C (8) << 20)    /* bytes */

/* Table entries.  L1, refcount table and standard L2 entries are u64;
 * extended L2 entries add a u64 subcluster bitmap (alloc bits 0-31,
 * reads-as-zero bits 32-63).
 */
#define QCOW2_L1E_SIZE                  8
#define QCOW2_L2E_SIZE_NORMAL           8
#define QCOW2_L2E_SIZE_EXTENDED         16
#define QCOW2_REFTE_SIZE                8

#define QCOW2_OFLAG_COPIED              (UINT64_C (1) << 63)
#define QCOW2_OFLAG_COMPRESSED          (UINT64_C (1) << 62)
#define QCOW2_OFLAG_ZERO                (UINT64_C (1) << 0)   /* v3 std L2 */

#define QCOW2_L1E_OFFSET_MASK           UINT64_C (0x00fffffffffffe00)
#define QCOW2_L1E_RESERVED_MASK         UINT64_C (0x7f000000000001ff)
#define QCOW2_L2E_OFFSET_MASK           UINT64_C (0x00fffffffffffe00)
#define QCOW2_L2E_STD_RESERVED_MASK     UINT64_C (0x3f000000000001fe)
#define QCOW2_REFT_OFFSET_MASK          UINT64_C (0xfffffffffffffe00)
#define QCOW2_REFT_RESERVED_MASK        UINT64_C (0x1ff)

/* L1 and L2 entries hold host offsets in bits 9-55: metadata and data
 * clusters must lie below 64 PiB.
 */
#define QCOW2_MAX_HOST_OFFSET           (UINT64_C (1) << 56)

/* More of QEMU's limits: snapshots, the backing format name. */
#define QCOW2_MAX_SNAPSHOTS             65536
#define QCOW2_MAX_BACKING_FMT           15      /* QEMU: < 16 bytes */
#define QCOW2_SNAPSHOT_HEADER_MIN       40      /* fixed part of an entry */

/* The bitmaps extension (QCOW2_EXT_BITMAPS), valid only while the
 * autoclear bit QCOW2_AUTOCLEAR_BITMAPS is set: u32 nb_bitmaps, u32
 * reserved (0), u64 bitmap_directory_size, u64 bitmap_directory_offset.
 * The limits are QEMU's (block/qcow2.h, block/qcow2-bitmap.c): an image
 * past them does not open in QEMU at all.
 */
#define QCOW2_BITMAPS_EXT_SIZE          24
#define QCOW2_MAX_BITMAPS               65535
#define QCOW2_MAX_BITMAP_DIR_SIZE       (UINT64_C (1024) * QCOW2_MAX_BITMAPS)

/* Bitmap directory entry: u64 table offset, u32 table size (entries),
 * u32 flags, u8 type, u8 granularity bits, u16 name size, u32 extra
 * data size; then the extra data, the name (no NUL) and zero padding
 * to 8 bytes.
 */
#define QCOW2_BME_TABLE_OFFSET          0
#define QCOW2_BME_TABLE_SIZE            8
#define QCOW2_BME_FLAGS                 12
#define QCOW2_BME_TYPE                  16
#define QCOW2_BME_GRANULARITY_BITS      17
#define QCOW2_BME_NAME_SIZE             18
#define QCOW2_BME_EXTRA_DATA_SIZE       20
#define QCOW2_BME_HEADER_SIZE           24
#define QCOW2_BME_FLAG_IN_USE           (UINT32_C (1) << 0)
#define QCOW2_BME_FLAG_AUTO             (UINT32_C (1) << 1)
/* The spec defines bit 2 (extra_data_compatible); QEMU refuses it, and
 * so does everything else here.
 */
#define QCOW2_BME_RESERVED_FLAGS        UINT32_C (0xfffffffc)
#define QCOW2_BME_TYPE_DIRTY_TRACKING   1
#define QCOW2_BME_MIN_GRANULARITY_BITS  9
#define QCOW2_BME_MAX_GRANULARITY_BITS  31
#define QCOW2_BME_MAX_NAME_SIZE         1023
#define QCOW2_BME_MAX_TABLE_SIZE        UINT64_C (0x8000000)    /* entries */
#define QCOW2_BME_MAX_PHYS_SIZE         UINT64_C (0x20000000)   /* data bytes */

/* Bitmap table entries: a data cluster offset, or 0 with bit 0 saying
 * whether the cluster reads as all zeroes (0) or all ones (1).
 */
#define QCOW2_BMT_OFFSET_MASK           UINT64_C (0x00fffffffffffe00)
#define QCOW2_BMT_RESERVED_MASK         UINT64_C (0xff000000000001fe)
#define QCOW2_BMT_ALL_ONES              UINT64_C (1)

/* Compressed descriptors count 512-byte sectors. */
#define QCOW2_COMPRESSED_SECTOR         512
/* Extended L2: all 32 subclusters allocated. */
#define QCOW2_L2_BITMAP_ALL_ALLOC       UINT64_C (0xffffffff)

#endif /* NBDD_QCOW2_FORMAT_H */
