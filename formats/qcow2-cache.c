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
 * The read side never dirties a slice; the write side will add dirty
 * tracking and write-back ordering here (see STYLE.md B22).
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
  void *data;                   /* entry_size bytes, or NULL until used */
  struct qcow2_cache_entry *hnext;               /* hash chain */
  struct qcow2_cache_entry *lru_prev, *lru_next; /* when pins == 0 */
  bool on_lru;
};

struct qcow2_cache {
  pthread_mutex_t lock;
  pthread_cond_t cond;          /* a load finished or a pin was dropped */
  struct node *file;            /* never changes */
  const char *what;
  uint32_t entry_size;
  size_t nr_entries;
  struct qcow2_cache_entry *slots;
  struct qcow2_cache_entry **buckets;
  size_t nr_buckets;            /* power of 2 */
  /* LRU list of unpinned slots: head is the least recently used. */
  struct qcow2_cache_entry *lru_head, *lru_tail;
  uint64_t hits, misses;
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
qcow2_cache_new (struct node *file, uint32_t entry_size, size_t nr_entries,
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
  uint64_t fsize = c->file->size;
  uint64_t n = offset < fsize ? MIN ((uint64_t) c->entry_size,
                                     fsize - offset) : 0;

  if (n < c->entry_size)
    memset ((char *) data + n, 0, c->entry_size - n);
  return n ? node_pread (c->file, data, n, offset, 0) : 0;
}

int
qcow2_cache_get (struct qcow2_cache *c, uint64_t offset,
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

  r = load (c, offset, e->data);

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
