/* qcow2: a bounded cache of metadata slices (L2 tables, refcount blocks).
 *
 * Design: a fixed array of at most nr_entries slots, a hash table from
 * host offset to slot, and an LRU list of the slots nobody has pinned.
 * A slot's buffer is allocated the first time the slot is used, so an
 * idle node costs only the slot array, never the configured maximum.
 *
 * Locking: one mutex per cache protects every field of every slot
 * except the slice data.  The data of a slot is written only while it
 * is LOADING (by the one thread loading it, outside the mutex) and is
 * read-only while pinned by anyone, so readers use it without the
 * lock.  A thread that wants a slice another thread is loading waits on
 * 'cond'; so does a thread that needs a slot while all are pinned.
 * Because a thread holds at most one pin per cache while it waits, the
 * pinned slots always belong to threads that will put them: no
 * deadlock.
 *
 * Write-back: the write side changes slices in place (qcow2_cache_dirty)
 * and they reach the file when the cache is flushed, at an image flush
 * or when a dirty slot must be reused.  Slices are only changed, and
 * only flushed, under the image's metadata lock (qcow2_state.lock), so
 * nobody reads a slice while it changes.  The order of writes to the
 * file follows QEMU's rules (qcow2-cache.c there): a cache may depend
 * on another, whose dirty slices are then written and synced first
 * (new refcounts before the L2 entries that use them; an L2 entry gone
 * before the refcount saying its cluster is free), and on a sync of the
 * file itself (data copied for COW before the L2 entry pointing at it).
 */
#include <config.h>

#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "qcow2.h"
#include "utils.h"

enum slot_state {
  SLOT_FREE,                    /* not in the hash table */
  SLOT_LOADING,                 /* in the table, data being read */
  SLOT_READY,
};

struct qcow2_cache_entry {
  uint64_t offset;              /* host offset of the slice */
  enum slot_state state;
  unsigned pins;
  bool dirty;                   /* changed since it was read or written */
  void *data;                   /* entry_size bytes, or NULL until used */
  struct qcow2_cache_entry *hnext;               /* hash chain */
  struct qcow2_cache_entry *lru_prev, *lru_next; /* when pins == 0 */
  bool on_lru;
};

struct qcow2_cache {
  pthread_mutex_t lock;
  pthread_cond_t cond;          /* a load finished or a pin was dropped */
  struct node_child *file;      /* the edge: its node may be replaced */
  const char *what;
  uint32_t entry_size;
  size_t nr_entries;
  struct qcow2_cache_entry *slots;
  struct qcow2_cache_entry **buckets;
  size_t nr_buckets;            /* power of 2 */
  /* LRU list of unpinned slots: head is the least recently used. */
  struct qcow2_cache_entry *lru_head, *lru_tail;
  uint64_t hits, misses;
  /* Write-back ordering; changed under the image's metadata lock. */
  struct qcow2_cache *depends;  /* flush and sync this one first */
  bool depends_on_flush;        /* sync the file first */
  size_t nr_dirty;
};

static size_t
bucket_of (const struct qcow2_cache *c, uint64_t offset)
{
  uint64_t k = offset / c->entry_size;

  k *= UINT64_C (0x9e3779b97f4a7c15);  /* Fibonacci hashing */
  return (size_t) (k >> 32) & (c->nr_buckets - 1);
}

static void
lru_remove (struct qcow2_cache *c, struct qcow2_cache_entry *e)
{
  if (!e->on_lru)
    return;
  if (e->lru_prev)
    e->lru_prev->lru_next = e->lru_next;
  else
    c->lru_head = e->lru_next;
  if (e->lru_next)
    e->lru_next->lru_prev = e->lru_prev;
  else
    c->lru_tail = e->lru_prev;
  e->lru_prev = e->lru_next = NULL;
  e->on_lru = false;
}

static void
lru_append (struct qcow2_cache *c, struct qcow2_cache_entry *e)
{
  e->lru_prev = c->lru_tail;
  e->lru_next = NULL;
  if (c->lru_tail)
    c->lru_tail->lru_next = e;
  else
    c->lru_head = e;
  c->lru_tail = e;
  e->on_lru = true;
}

static void
hash_remove (struct qcow2_cache *c, struct qcow2_cache_entry *e)
{
  struct qcow2_cache_entry **pp = &c->buckets[bucket_of (c, e->offset)];

  while (*pp && *pp != e)
    pp = &(*pp)->hnext;
  if (*pp)
    *pp = e->hnext;
  e->hnext = NULL;
}

static struct qcow2_cache_entry *
hash_find (struct qcow2_cache *c, uint64_t offset)
{
  struct qcow2_cache_entry *e = c->buckets[bucket_of (c, offset)];

  while (e && e->offset != offset)
    e = e->hnext;
  return e;
}

struct qcow2_cache *
qcow2_cache_new (struct node_child *file, uint32_t entry_size, size_t nr_entries,
                 const char *what)
{
  struct qcow2_cache *c = calloc (1, sizeof *c);

  if (c == NULL)
    return NULL;
  c->file = file;
  c->what = what;
  c->entry_size = entry_size;
  c->nr_entries = nr_entries ?: 1;
  c->nr_buckets = 16;
  while (c->nr_buckets < c->nr_entries)
    c->nr_buckets <<= 1;
  c->slots = calloc (c->nr_entries, sizeof *c->slots);
  c->buckets = calloc (c->nr_buckets, sizeof *c->buckets);
  if (c->slots == NULL || c->buckets == NULL) {
    free (c->slots);
    free (c->buckets);
    free (c);
    return NULL;
  }
  for (size_t i = 0; i < c->nr_entries; ++i)
    lru_append (c, &c->slots[i]);
  pthread_mutex_init (&c->lock, NULL);
  pthread_cond_init (&c->cond, NULL);
  return c;
}

void
qcow2_cache_free (struct qcow2_cache *c)
{
  if (c == NULL)
    return;
  for (size_t i = 0; i < c->nr_entries; ++i)
    free (c->slots[i].data);
  free (c->slots);
  free (c->buckets);
  pthread_cond_destroy (&c->cond);
  pthread_mutex_destroy (&c->lock);
  free (c);
}

/* Read a slice; bytes past the end of the file read as zero (qcow2
 * files are not padded to whole clusters).
 */
static int
load (struct qcow2_cache *c, uint64_t offset, void *data)
{
  uint64_t fsize = node_size (c->file->node);
  uint64_t n = offset < fsize ? MIN ((uint64_t) c->entry_size,
                                     fsize - offset) : 0;

  if (n < c->entry_size)
    memset ((char *) data + n, 0, c->entry_size - n);
  return n ? node_pread (c->file->node, data, n, offset, 0) : 0;
}

static int get_slot (struct qcow2_cache *c, uint64_t offset, bool load_it,
                     struct qcow2_cache_entry **ep, const void **data);

int
qcow2_cache_get (struct qcow2_cache *c, uint64_t offset,
                 struct qcow2_cache_entry **ep, const void **data)
{
  return get_slot (c, offset, true, ep, data);
}

int
qcow2_cache_get_new (struct qcow2_cache *c, uint64_t offset,
                     struct qcow2_cache_entry **ep, void **data)
{
  const void *d;
  int r = get_slot (c, offset, false, ep, &d);

  if (r < 0)
    return r;
  *data = qcow2_cache_dirty (c, *ep);
  return 0;
}

int
qcow2_cache_peek (struct qcow2_cache *c, uint64_t offset,
                  struct qcow2_cache_entry **ep, const void **data)
{
  struct qcow2_cache_entry *e;

  pthread_mutex_lock (&c->lock);
  e = hash_find (c, offset);
  if (e == NULL || e->state != SLOT_READY) {
    pthread_mutex_unlock (&c->lock);
    return -EAGAIN;
  }
  lru_remove (c, e);
  e->pins++;
  c->hits++;
  pthread_mutex_unlock (&c->lock);
  *ep = e;
  *data = e->data;
  return 0;
}

static int
get_slot (struct qcow2_cache *c, uint64_t offset, bool load_it,
          struct qcow2_cache_entry **ep, const void **data)
{
  struct qcow2_cache_entry *e;
  int r;

  pthread_mutex_lock (&c->lock);
  for (;;) {
    e = hash_find (c, offset);
    if (e && e->state == SLOT_READY) {
      lru_remove (c, e);
      e->pins++;
      c->hits++;
      pthread_mutex_unlock (&c->lock);
      if (!load_it)             /* a new table where an old one was */
        memset (e->data, 0, c->entry_size);
      *ep = e;
      *data = e->data;
      return 0;
    }
    if (e) {                    /* another thread is loading it */
      pthread_cond_wait (&c->cond, &c->lock);
      continue;
    }
    if (c->lru_head == NULL) {  /* every slot is pinned */
      pthread_cond_wait (&c->cond, &c->lock);
      continue;
    }
    if (c->lru_head->dirty) {
      /* Reusing it would lose a change: write the cache back first. */
      pthread_mutex_unlock (&c->lock);
      r = qcow2_cache_flush (c);
      if (r < 0)
        return r;
      pthread_mutex_lock (&c->lock);
      continue;
    }
    break;
  }

  /* Miss: take the least recently used slot and load into it. */
  e = c->lru_head;
  lru_remove (c, e);
  if (e->state != SLOT_FREE)
    hash_remove (c, e);
  if (e->data == NULL &&
      posix_memalign (&e->data, 4096, c->entry_size) != 0) {
    e->data = NULL;
    e->state = SLOT_FREE;
    lru_append (c, e);
    pthread_mutex_unlock (&c->lock);
    return -ENOMEM;
  }
  e->offset = offset;
  e->state = SLOT_LOADING;
  e->pins = 1;
  e->hnext = c->buckets[bucket_of (c, offset)];
  c->buckets[bucket_of (c, offset)] = e;
  c->misses++;
  pthread_mutex_unlock (&c->lock);

  if (load_it)
    r = load (c, offset, e->data);
  else {
    memset (e->data, 0, c->entry_size);
    r = 0;
  }

  pthread_mutex_lock (&c->lock);
  if (r < 0) {
    /* Forget it: waiters retry the load themselves. */
    hash_remove (c, e);
    e->state = SLOT_FREE;
    e->pins = 0;
    lru_append (c, e);
  }
  else
    e->state = SLOT_READY;
  pthread_cond_broadcast (&c->cond);
  pthread_mutex_unlock (&c->lock);
  if (r < 0)
    return r;
  *ep = e;
  *data = e->data;
  return 0;
}

void
qcow2_cache_put (struct qcow2_cache *c, struct qcow2_cache_entry *e)
{
  pthread_mutex_lock (&c->lock);
  if (--e->pins == 0) {
    lru_append (c, e);
    pthread_cond_broadcast (&c->cond);
  }
  pthread_mutex_unlock (&c->lock);
}

void *
qcow2_cache_dirty (struct qcow2_cache *c, struct qcow2_cache_entry *e)
{
  if (!e->dirty) {
    e->dirty = true;
    c->nr_dirty++;
  }
  return e->data;
}

/* Write back and sync what @c depends on, and forget the dependency. */
static int
flush_dependency (struct qcow2_cache *c)
{
  struct qcow2_cache *dep = c->depends;
  int r;

  c->depends = NULL;
  if ((r = qcow2_cache_flush (dep)) < 0 || (r = node_flush (c->file->node)) < 0) {
    c->depends = dep;
    return r;
  }
  c->depends_on_flush = false;
  return 0;
}

int
qcow2_cache_set_dependency (struct qcow2_cache *c, struct qcow2_cache *dep)
{
  int r;

  /* Never a cycle (QEMU's rule): a dependency that itself depends on
   * something, or a different dependency already set, is settled now.
   */
  if (dep->depends && (r = flush_dependency (dep)) < 0)
    return r;
  if (c->depends && c->depends != dep && (r = flush_dependency (c)) < 0)
    return r;
  c->depends = dep;
  return 0;
}

void
qcow2_cache_depends_on_flush (struct qcow2_cache *c)
{
  c->depends_on_flush = true;
}

/* Write one dirty slice; the file may need to grow to take it. */
static int
write_back (struct qcow2_cache *c, struct qcow2_cache_entry *e)
{
  int r = node_pwrite (c->file->node, e->data, c->entry_size, e->offset, 0);

  if (r < 0)
    return r;
  e->dirty = false;
  c->nr_dirty--;
  return 0;
}

int
qcow2_cache_flush (struct qcow2_cache *c)
{
  int r;

  /* What these slices rely on goes first, and is synced: a crash
   * between the two writes then leaves a leak at worst.
   */
  if (c->depends) {
    if ((r = flush_dependency (c)) < 0)
      return r;
  }
  else if (c->depends_on_flush) {
    if ((r = node_flush (c->file->node)) < 0)
      return r;
    c->depends_on_flush = false;
  }
  /* In offset order would be kinder to disks; the slot order is what
   * we have, and the kernel sorts writeback anyway.
   */
  for (size_t i = 0; i < c->nr_entries && c->nr_dirty > 0; ++i) {
    struct qcow2_cache_entry *e = &c->slots[i];
    if (e->dirty && e->state == SLOT_READY && (r = write_back (c, e)) < 0)
      return r;
  }
  return 0;
}

/* Forget slot @e if it is loaded and unpinned.  Under c->lock. */
static void
discard_slot (struct qcow2_cache *c, struct qcow2_cache_entry *e)
{
  if (e->state != SLOT_READY || e->pins > 0)
    return;
  if (e->dirty) {
    e->dirty = false;
    c->nr_dirty--;
  }
  hash_remove (c, e);
  e->state = SLOT_FREE;
}

void
qcow2_cache_discard (struct qcow2_cache *c, uint64_t offset)
{
  struct qcow2_cache_entry *e;

  pthread_mutex_lock (&c->lock);
  e = hash_find (c, offset);
  if (e)
    discard_slot (c, e);
  pthread_mutex_unlock (&c->lock);
}

void
qcow2_cache_discard_all (struct qcow2_cache *c)
{
  pthread_mutex_lock (&c->lock);
  for (size_t i = 0; i < c->nr_entries; ++i)
    discard_slot (c, &c->slots[i]);
  pthread_mutex_unlock (&c->lock);
}

void
qcow2_cache_stats (struct qcow2_cache *c, uint64_t *hits, uint64_t *misses,
                   size_t *nr_entries)
{
  pthread_mutex_lock (&c->lock);
  *hits = c->hits;
  *misses = c->misses;
  *nr_entries = c->nr_entries;
  pthread_mutex_unlock (&c->lock);
}
