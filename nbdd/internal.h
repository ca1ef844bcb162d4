/* nbdd/: the daemon.  Declarations shared between its files, grouped
 * by the file that defines them.
 *
 * Threads: everything here runs on the main thread (the libev loop)
 * except what worker.c runs on worker threads: a request's I/O and the
 * encoding of its reply (transmit.c:request_run, reply.c).  A request
 * belongs to exactly one thread at a time and moves between them
 * through worker.c's two locked queues.
 */
#ifndef NBDD_INTERNAL_H
#define NBDD_INTERNAL_H

#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>
#include <sys/uio.h>

#include <ev.h>

#include "error.h"
#include "graph.h"
#include "nbd-protocol.h"
#include "utils.h"

struct conn;

/* Largest READ/WRITE payload, advertised in NBD_INFO_BLOCK_SIZE. */
#define MAX_PAYLOAD             (32u << 20)
/* A rejected WRITE's payload up to this size is read and dropped to
 * keep the stream in sync; anything larger ends the connection.
 */
#define MAX_SKIP_PAYLOAD        (2 * (uint64_t) MAX_PAYLOAD)
/* Handshake bounds. */
#define MAX_OPTION_LEN          (1u << 20)
#define MAX_OPTIONS_BASE        64
#define MAX_OPTIONS_PER_EXPORT  8
/* Per-connection back-pressure: stop reading requests past these. */
#define MAX_IN_FLIGHT           256
#define MAX_IN_FLIGHT_BYTES     (128u << 20)
/* TLS: READ data read ahead of its encryption, shared by the TLS
 * connections reading, each allowed at least TLS_MIN_AHEAD_BYTES.  A
 * reply is cheapest to encrypt right after its read, by the same
 * thread, while its buffer is still in the CPU's cache; reading
 * further ahead only leaves buffers to go cold, and the encryption,
 * not the disk, sets the pace.  At least TLS_MIN_READS reads still
 * overlap, whatever their size.
 */
#define TLS_AHEAD_BYTES         (4u << 20)
#define TLS_MIN_AHEAD_BYTES     (1u << 20)
#define TLS_MIN_READS           2
/* Block status: descriptors per reply. */
#define MAX_EXTENTS             (1u << 16)
/* Sparse READ replies: at most this many chunks per reply. */
#define MAX_READ_CHUNKS         16
/* Reads up to this size are tried on the loop thread without blocking
 * (RWF_NOWAIT) before going to a worker.
 */
#define MAX_INLINE_READ         (64u << 10)
/* ...and at most this much per readable event, so one client cannot
 * hold the loop.
 */
#define MAX_INLINE_PER_EVENT    (4u << 20)
/* Reads from this size up (to SPLICE_PIPE_SIZE) are spliced from the
 * page cache into the socket where the node allows it.
 */
#define MIN_SPLICE_READ         (64u << 10)
/* Meta context ids (see meta.c), in the order of an export's table:
 * the fixed contexts, then (to come) one per exported dirty bitmap.
 */
#define META_ID_BASE_ALLOCATION   1
#define META_ID_ALLOCATION_DEPTH  2
#define META_ID_DIRTY_BITMAP      3
/* Contexts an export may offer: a connection's selection is a mask. */
#define MAX_META_CONTEXTS         64

/* config.c: the daemon's settings, parsed from the command line. */
struct listen_spec {
  char *spec;                   /* "unix:PATH" or "tcp:HOST:PORT" */
};

enum tls_mode { TLS_OFF = 0, TLS_ON, TLS_REQUIRE };

struct config {
  struct listen_spec *listen;
  size_t nr_listen;
  char **blockdevs;             /* --blockdev specs, in order */
  size_t nr_blockdevs;
  char **exports;               /* --export specs, in order */
  size_t nr_exports;
  bool stdio;
  bool foreground;
  bool exit_with_parent;
  char *state_dir;
  char *pidfile;
  char *config_file;            /* --config FILE, or NULL */
  char *admin_socket;           /* QMP socket path, or NULL for none */
  char *admin_group;            /* group allowed on it, or NULL */
  unsigned threads;
  unsigned max_connections;
  double handshake_timeout;     /* seconds; 0 = none */
  enum tls_mode tls;
  char *tls_certificates;       /* directory, or NULL */
  char *tls_psk;                /* psktool file, or NULL */
  bool tls_verify_peer;
  uint64_t poll_max_ns;         /* adaptive polling limit; 0 = off */
};

extern struct config config;
/* Exits on --help/--version (0) and on bad options (1, with a message). */
void config_parse (int argc, char **argv);
void config_free (void);

/* export.c */
struct export_stats {           /* counted on the loop thread */
  uint64_t rd_ops, wr_ops, rd_bytes, wr_bytes;
  uint64_t flush_ops, zero_ops, discard_ops, failed_ops;
};

struct export {
  char *id;
  char *name;
  char *description;            /* NULL if none */
  struct node_root root;        /* where its requests enter the graph */
  struct json_object *spec;     /* as added, for the catalogue */
  unsigned refcnt;              /* the export list, each client, ... */
  unsigned nr_clients;          /* connections in transmission */
  bool deleted;                 /* off the list; freed with its last client */
  bool delete_pending;          /* a block-export-del awaits its commit */
  struct export *dying_next;    /* deleted, clients still connected */
  bool recorded;                /* in the catalogue */
  bool writable;
  bool tls_required;            /* only over TLS, even with --tls=on */
  char **tls_allow;             /* identities allowed; NULL = anyone */
  size_t nr_tls_allow;
  struct export_stats stats;
  /* Dirty bitmaps exported as qemu:dirty-bitmap:NAME: each marked
   * busy, and its node referenced, while the export lives.
   */
  struct dirty_bitmap **bitmaps;
  size_t nr_bitmaps;
  struct meta_context *contexts;  /* NULL: the fixed table */
  size_t nr_contexts;
};

/* What a connection, at this point of its handshake, may do with an
 * export.
 */
enum export_access {
  EXPORT_OK,
  EXPORT_TLS_REQUIRED,          /* not before TLS */
  EXPORT_HIDDEN,                /* not for this client at all */
};

int export_add_spec (const char *spec, struct error **errp);
/* block-export-add: @o is borrowed (a reference is kept as its spec). */
int export_add (struct json_object *o, struct error **errp);
struct export *export_by_id (const char *id);
/* block-export-del: refused while clients are connected unless @hard,
 * which disconnects them.
 */
int export_delete (struct export *exp, bool hard, struct error **errp);
/* Undo a block-export-add that no client has seen: gone, no event. */
void export_discard (struct export *exp);
void export_ref (struct export *exp);
unsigned export_clients (const struct export *exp);
/* Exports deleted whose clients are still finishing: follow
 * ->dying_next.
 */
struct export *export_first_dying (void);
void export_unref (struct export *exp);
/* Resolve a client's export name; "" is the only export if there is
 * exactly one.  Borrowed.
 */
struct export *export_find (const char *name);
size_t export_count (void);
enum export_access export_access (const struct export *exp,
                                  const struct conn *c);
/* Whether any export needs TLS (then, before TLS, unknown names are
 * answered like TLS-only ones).
 */
bool export_any_tls_only (void);
struct export *export_nth (size_t i);
void export_close_all (void);
/* Transmission flags for a connection in the given reply mode. */
uint16_t export_tx_flags (const struct export *exp, bool structured);

/* meta.c: the meta contexts an export offers for NBD_CMD_BLOCK_STATUS. */
struct meta_context {
  const char *name;             /* full name, "qemu:allocation-depth" */
  /* Besides its namespace, LIST "name[0, group_len)" lists it too
   * ("qemu:dirty-bitmap:" for a bitmap); 0 if it has no group.
   */
  size_t group_len;
  uint32_t id;                  /* NBD context id, > 0; ascending in a table */
  /* Worker thread: describe @count bytes of @node from el->end on,
   * appending to @el until the range is covered or the list is full;
   * at least one extent (count > 0).  The extent flags are the
   * context's descriptor flags.  0 or -errno.
   */
  int (*extents) (const struct meta_context *mc, struct node *node,
                  uint64_t count, struct extent_list *el);
  void *opaque;                 /* the dirty bitmap, for its contexts */
};

/* The contexts @exp offers, in ascending id order, at most
 * MAX_META_CONTEXTS.  Borrowed: valid as long as the export.
 */
const struct meta_context *meta_contexts (const struct export *exp,
                                          size_t *nr);
/* Build @exp's own table when it exports bitmaps (exp->bitmaps). */
int meta_export_init (struct export *exp, struct error **errp);
void meta_export_free (struct export *exp);
/* Every context @exp offers, as a mask over meta_contexts (): bit i is
 * the i-th context.
 */
uint64_t meta_all (const struct export *exp);
/* The contexts one query (@len bytes, not NUL-terminated) selects, as a
 * mask: a full name for LIST or SET; with @list also a namespace
 * ("qemu:") or group.  0 for anything unknown.
 */
uint64_t meta_query (const struct export *exp, const char *q, size_t len,
                     bool list);

/* worker.c */
struct request;

int workers_start (struct ev_loop *loop, unsigned nr, struct error **errp);
/* Queue a request; it reaches the workers at the next workers_kick,
 * which conns_flush_dirty calls at the end of every loop callback.
 */
void workers_submit (struct request *req);
void workers_kick (void);
void workers_stop (void);
/* Requests submitted whose completion the loop has not yet seen. */
unsigned workers_outstanding (void);

/* loop.c: the event loop, polling adaptively before it sleeps. */
void loop_run (struct ev_loop *loop);
/* Make loop_run return (ev_break alone would only end one pass). */
void loop_quit (struct ev_loop *loop);
/* Stop the daemon: no new clients, and loop_run returns (loop thread). */
void daemon_quit (void);

/* pipes.c: pooled pipes for zero-copy reads. */
#define SPLICE_PIPE_SIZE        (256u << 10)
struct splice_pipe {
  struct splice_pipe *next;     /* in the pool */
  int rd, wr;
};
/* A pipe with room for SPLICE_PIPE_SIZE bytes, or NULL if the pool is
 * exhausted.  Any thread.
 */
struct splice_pipe *pipe_get (void);
/* Back to the pool, or closed if it still holds data (its client went
 * away, or a splice failed half-way).
 */
void pipe_put (struct splice_pipe *p);
void pipes_free_all (void);

/* listen.c */
int listeners_open (struct ev_loop *loop, struct error **errp);
void listeners_close (struct ev_loop *loop);
/* Stop or resume accepting (while accept fails with EMFILE). */
void listeners_pause (struct ev_loop *loop, bool pause);

/* conn.c: one client connection. */
enum reply_mode {
  MODE_SIMPLE = 0,
  MODE_STRUCTURED,
  MODE_EXTENDED,
};

struct conn;

/* Something queued for sending: a run of iovecs, released when sent. */
struct out_item {
  struct out_item *next;
  struct iovec *iov;
  unsigned niov;
  unsigned pos;                 /* first iovec not yet fully sent */
  /* After the iovecs, this many bytes from a pipe (READ data). */
  struct splice_pipe *pipe;
  size_t pipe_left;
  bool encrypt;                 /* TLS: plaintext, encrypted at its turn */
  void (*release) (struct conn *c, struct out_item *item);
};

enum conn_state {
  CS_CFLAGS,                    /* waiting for the client flags */
  CS_OPTION,                    /* waiting for an option header */
  CS_OPTION_DATA,               /* reading an option's payload */
  CS_OPTION_SKIP,               /* dropping an option's payload */
  CS_REQUEST,                   /* waiting for a request header */
  CS_PAYLOAD,                   /* reading a WRITE payload */
  CS_PAYLOAD_SKIP,              /* dropping a rejected payload */
  CS_TLS_HANDSHAKE,             /* STARTTLS acknowledged: TLS handshake */
  CS_DRAIN,                     /* no more input: finish and close */
};

#define CONN_INBUF_SIZE 65536

struct conn {
  struct conn *next, *prev;     /* all connections */
  struct ev_loop *loop;
  ev_io rio;                    /* readable (in_fd) */
  ev_io wio;                    /* writable (out_fd), when output waits */
  ev_timer handshake_timer;
  int in_fd, out_fd;            /* the same socket, or stdin/stdout */
  bool is_stdio;
  char *peer;                   /* "unix", "127.0.0.1:4567", for logs */
  bool exit_loop_on_close;      /* --stdio: the daemon ends with it */

  enum conn_state state;
  bool dead;                    /* fds closed; waiting for in_flight */
  bool reading;                 /* rio started */
  bool in_dirty_list;           /* output waits for a flush */
  struct conn *dirty_next;

  /* Buffered input: bytes [in_start, in_end) of inbuf are unread. */
  unsigned char *inbuf;
  size_t in_start, in_end;

  /* Handshake state. */
  uint32_t cflags;
  bool fixed_newstyle, no_zeroes;
  unsigned nr_options;
  uint32_t opt, optlen;         /* the option being read */
  bool refuse_tls_reqd;         /* answer it ERR_TLS_REQD once skipped */
  unsigned char *optbuf;        /* its payload */
  size_t opt_got;
  uint64_t skip;                /* bytes still to drop */
  bool structured;              /* NBD_OPT_STRUCTURED_REPLY acked */
  bool extended;                /* NBD_OPT_EXTENDED_HEADERS acked */
  /* Contexts selected by SET_META_CONTEXT: bit i is the i-th of
   * meta_contexts (meta_export).  Fixed once in transmission, so the
   * workers read it without a lock.
   */
  uint64_t meta_selected;
  char *meta_export;            /* export the contexts were set for */

  /* Transmission state. */
  struct export *exp;           /* holds a reference */
  enum reply_mode mode;
  uint16_t eflags;
  struct request *cur;          /* request whose payload is arriving */
  struct request *free_reqs;    /* recycled requests */
  unsigned nr_free_reqs;
  size_t free_bytes;            /* buffer bytes held by free_reqs */
  unsigned in_flight;           /* requests not yet fully sent */
  unsigned writes_in_flight;    /* WRITE/ZERO/TRIM at the workers */
  uint64_t inline_bytes;        /* read inline in this readable event */
  uint64_t in_flight_bytes;
  uint64_t read_bytes_ahead;    /* TLS: READ data not yet encrypted */
  unsigned reads_ahead;         /* ...and their READs */
  uint64_t nr_requests;         /* requests received, for the logs */
  uint64_t bytes_read;          /* READ and WRITE data, for query-connections */
  uint64_t bytes_written;
  uint64_t id;                  /* unique, for query-connections */
  ev_tstamp started;

  /* Output.  Replies are written by the loop (conn_flush) or, when
   * nothing is queued, straight from the worker that finished the
   * request (worker.c), saving a trip through the loop.  send_lock
   * makes each reply's bytes contiguous on the wire and protects the
   * fields below it.  A reply a worker could send only in part blocks
   * all other output until the loop has queued its rest at the head.
   */
  pthread_mutex_t send_lock;
  struct out_item *out_head, *out_tail;
  bool out_partial;             /* a partly sent reply is in transit */
  uint64_t nr_spliced;          /* READs whose data was spliced */
  size_t queued_bytes;          /* in byte chunks (TLS records) */

  /* TLS: set by STARTTLS; every byte in and out goes through it once
   * tls_up.  Calls into the session are made under send_lock.
   */
  struct tls_session *tls;
  bool tls_up;                  /* handshake done */
  bool tls_broken;              /* a send failed: the session is unusable */
  /* While conn_flush encrypts the run of replies at the head,
   * overflow goes in front of the queue, after push_after (see
   * conn_send_locked).
   */
  bool push_front;
  struct out_item *push_after;
  bool tls_bye_sent;
};

/* Accept a connection on fd (or in_fd/out_fd for --stdio).  The conn
 * owns the fds.
 */
struct conn *conn_new (struct ev_loop *loop, int in_fd, int out_fd,
                       const char *peer, struct error **errp);
void conn_queue (struct conn *c, struct out_item *item);
/* Queue @len bytes (copied). */
int conn_queue_copy (struct conn *c, const void *data, size_t len);
/* With send_lock held: send these bytes now if nothing is queued,
 * and queue (a copy of) what does not go out.  -1 only if out of
 * memory.
 */
int conn_send_locked (struct conn *c, const struct iovec *iov, int niov);
/* Bytes of input read but not yet parsed. */
size_t conn_input_buffered (const struct conn *c);
/* Send what is queued, as far as the socket takes it. */
void conn_flush (struct conn *c);
/* Close the connection now (fds shut, requests in flight finish). */
void conn_close (struct conn *c, const char *why);
/* Stop reading; close once every reply has gone out. */
void conn_drain (struct conn *c);
/* TLS: count a READ's data as read ahead of its encryption, until
 * the request is put back.
 */
void conn_read_ahead (struct conn *c, struct request *req);
/* Request back to the connection's pool (or freed). */
struct request *conn_request_get (struct conn *c, uint64_t count);
void conn_request_put (struct conn *c, struct request *req);
/* Count memory a request will use beyond its buffer (block status). */
void conn_request_charge (struct conn *c, struct request *req,
                          uint64_t bytes);
/* A completed request comes back from the workers (main thread). */
void conn_request_done (struct request *req);
/* Worker thread: send the replies of the run of finished requests
 * starting at @first (linked by ->next) that belong to its connection,
 * if nothing else is queued there.  Marks each sent, partly sent, or
 * neither; returns the length of the run.
 */
unsigned conn_send_direct (struct request *first);
/* Worker thread: send a READ reply whose data waits in req->out.pipe,
 * splicing it into the socket, if nothing else is queued there.  Marks
 * the request sent, partly sent, or neither; the loop sends the rest.
 */
void conn_send_spliced (struct request *req);
/* Called once per loop iteration after completions: flush output. */
void conns_flush_dirty (void);
unsigned conn_count (void);
/* Close the oldest connection still in the handshake, to make room.
 * False if every connection is past it.
 */
bool conn_evict_handshake (void);
void conns_close_all (const char *why);
/* Close every connection to @exp (block-export-del mode hard). */
void conns_close_export (struct export *exp);
/* Iterate over connections: follow ->next. */
struct conn *conn_first (void);
void conn_mark_dirty (struct conn *c);
/* Resume reading if back-pressure allows it. */
void conn_update_reading (struct conn *c);
/* Parse buffered input.  Return -1 if the conn was closed. */
int conn_process_input (struct conn *c);

/* handshake.c */
void hs_start (struct conn *c);
/* Input in the handshake states; returns 1 if more input is needed,
 * 0 to continue parsing, -1 if the connection was closed.
 */
int hs_on_cflags (struct conn *c, const unsigned char *buf);
int hs_on_option_header (struct conn *c, const unsigned char *buf);
int hs_on_option_data (struct conn *c);
void hs_option_skipped (struct conn *c);

/* tls.c */
struct tls_session;
int tls_init (struct error **errp);
void tls_reload (void);
void tls_deinit (void);
/* Main thread: a session for @c (c->tls), after the STARTTLS ACK is
 * queued.  -1 on failure (logged).
 */
int tls_start (struct conn *c);
/* With send_lock held: advance the handshake.  1 done, 0 waiting for
 * the client, -1 failed (logged).
 */
int tls_handshake (struct conn *c);
/* With send_lock held.  As read(2): bytes, 0 at EOF, -1 with errno. */
ssize_t tls_recv (struct conn *c, void *buf, size_t len);
/* Decrypted input is buffered in the session (the socket will not
 * say so).
 */
bool tls_pending (struct conn *c);
/* With send_lock held: nothing left to read, neither in the session
 * nor in the socket (as far as the last read could tell).
 */
bool tls_drained (struct conn *c);
/* With send_lock held throughout: encrypt replies, whose
 * records leave in as few writes as they fit: tls_send_begin, then
 * tls_send_part for each reply, then tls_send_end, which sends what is
 * left (or queues it).  Each returns 0, or -1 if the session failed.
 */
void tls_send_begin (struct conn *c);
int tls_send_part (struct conn *c, const struct iovec *iov, unsigned niov);
int tls_send_end (struct conn *c);
void tls_bye (struct conn *c);
/* The client's PSK username or certificate subject, or NULL. */
const char *tls_identity (const struct conn *c);
void tls_free (struct conn *c);

/* transmit.c */
struct request {
  struct request *next;         /* in whichever queue holds it */
  struct conn *conn;
  uint16_t type;
  uint16_t flags;               /* NBD_CMD_FLAG_* */
  uint64_t cookie;
  uint64_t offset;
  uint64_t count;
  uint32_t nbd_err;             /* set by validation: no I/O, just reply */
  int err;                      /* -errno from the node */
  const char *errmsg;           /* static message for validation errors */
  void *buf;                    /* payload; aligned for O_DIRECT */
  size_t buf_cap;
  uint64_t payload_got;         /* WRITE payload bytes read so far */
  struct extent_list extents;   /* BLOCK_STATUS, one context at a time
                                   (kept for reuse) */
  size_t status_len;            /* BLOCK_STATUS: reply bytes in buf */
  size_t status_last;           /* ...and where its last chunk starts */
  uint64_t bytes;               /* counted in conn->in_flight_bytes */
  uint64_t ahead;               /* counted in conn->read_bytes_ahead */
  bool spliced;                 /* READ data went through a pipe */
  bool sent;                    /* a worker sent the whole reply */
  bool partial;                 /* a worker sent part of it */

  /* The encoded reply. */
  struct out_item out;
  struct iovec iov[2 * MAX_READ_CHUNKS + 4];
  unsigned char hdr[MAX_READ_CHUNKS * 48 + 320];
};

/* Input in CS_REQUEST: buf holds a full header (28 or 32 bytes). */
int tx_on_request_header (struct conn *c, const unsigned char *buf);
/* The WRITE payload of c->cur is complete. */
void tx_on_payload_done (struct conn *c);
/* A rejected payload has been dropped: reply to c->cur. */
void tx_on_payload_skipped (struct conn *c);
/* Main thread: a request came back from the workers. */
void tx_request_completed (struct conn *c, struct request *req);
/* Worker thread: do the I/O and encode the reply (a READ may be
 * spliced and sent already, see req->spliced).
 */
void request_run (struct request *req);
/* Main thread: encode an error reply for a request that did no I/O. */
void request_reply_now (struct conn *c, struct request *req);

/* reply.c (called on worker threads and the main thread) */
void reply_encode (struct request *req);
/* Worker thread: BLOCK_STATUS replies are built whole in req->buf, one
 * chunk per context (header and descriptors, clipped to the request),
 * before reply_encode marks the last chunk DONE.  reply_status_add:
 * 0, -ENOMEM, or -EIO for an extent list with nothing in the request.
 */
void reply_status_reset (struct request *req);
int reply_status_add (struct request *req, uint32_t id,
                      const struct extent_list *el);

/* admin.c: the QMP admin socket. */
struct admin_peer {
  uid_t uid;
  pid_t pid;
};
int admin_open (struct ev_loop *loop, const char *path, const char *group,
                struct error **errp);
void admin_close (void);
/* Serve QMP on @fd, connected to a peer already allowed in (accepted
 * connections; the fuzzer).  The session owns @fd.
 */
void admin_session_start (struct ev_loop *loop, int fd, uid_t uid,
                          pid_t pid);
/* Sessions, the closed ones included until they are freed. */
unsigned admin_session_count (void);
/* Send an event to every session (takes @data). */
void admin_event (const char *name, struct json_object *data);
void admin_event_export_deleted (const char *id);
/* {"qemu": {"major", "minor", "micro"}, "package"}. */
struct json_object *admin_version (void);

/* qmp.c: run one command; returns {"return": ...} or {"error": ...}. */
struct json_object *qmp_execute (const char *name, struct json_object *args,
                                 const struct admin_peer *peer);
void qmp_init (void);

/* state.c: the catalogue in the state dir, and the graph it records. */
extern struct catalog *catalog;
/* Take the state dir (before anything listens: a second daemon must
 * not touch the first one's sockets).  Exits if another daemon has it.
 */
void state_lock (void);
/* Open the catalogue (if there is a state dir) and rebuild the nodes,
 * throttle groups and exports it holds.  Exits with a message if it
 * cannot: never a half-started daemon.
 */
void state_open (void);
/* ...then, after the command line's nodes, the exports. */
void state_open_exports (void);
void state_close (void);


/* fleece.c: point-in-time snapshots for backups (the commands are in
 * qmp.h).  Events go out from the loop; at start, the sessions a crash
 * cut short end as failures (0, or -1 with errp).
 */
void fleece_init (struct ev_loop *loop);
int fleece_recover (struct error **errp);
/* The id of the fleece @n is part of (its node, filter, snapshot or
 * scratch), or NULL: graph changes there are refused.
 */
const char *fleece_owning (const struct node *n);

/* qmp-job.c: block jobs tell the loop when they are ready or done; at
 * start, the jobs a stop cut short are picked up (state_open_exports).
 */
void qmp_jobs_init (struct ev_loop *loop);
void qmp_jobs_recover (void);
/* After an admin command's catalogue transaction: forget the jobs it
 * ended.
 */
void qmp_jobs_forget_ended (void);

/* listen.c: set when the daemon is stopping; no new clients. */
extern bool shutting_down;

#endif /* NBDD_INTERNAL_H */
