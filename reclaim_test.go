package tenantpg

import (
	"context"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"go.opentelemetry.io/otel/attribute"
)

// Reclaiming what a closed *sql.DB abandoned, and leak detection (#13,
// parts 2 and 3).

// recordingHandler keeps every log record, and signals each one.
type recordingHandler struct {
	mu    sync.Mutex
	recs  []slog.Record
	added chan struct{}
}

func newRecordingHandler() *recordingHandler {
	return &recordingHandler{added: make(chan struct{}, 1)}
}

func (h *recordingHandler) Enabled(context.Context, slog.Level) bool { return true }
func (h *recordingHandler) WithAttrs([]slog.Attr) slog.Handler       { return h }
func (h *recordingHandler) WithGroup(string) slog.Handler            { return h }

func (h *recordingHandler) Handle(_ context.Context, r slog.Record) error {
	h.mu.Lock()
	h.recs = append(h.recs, r.Clone())
	h.mu.Unlock()
	select {
	case h.added <- struct{}{}:
	default:
	}
	return nil
}

// logLine is a record flattened for assertions.
type logLine struct {
	level slog.Level
	msg   string
	attrs map[string]string
}

// lines returns the records at level whose message contains msg.
func (h *recordingHandler) lines(level slog.Level, msg string) []logLine {
	h.mu.Lock()
	defer h.mu.Unlock()
	var out []logLine
	for _, r := range h.recs {
		if r.Level != level || !strings.Contains(r.Message, msg) {
			continue
		}
		l := logLine{level: r.Level, msg: r.Message, attrs: map[string]string{}}
		r.Attrs(func(a slog.Attr) bool {
			l.attrs[a.Key] = a.Value.String()
			return true
		})
		out = append(out, l)
	}
	return out
}

// all returns every record's message and attributes as text.
func (h *recordingHandler) all() string {
	h.mu.Lock()
	defer h.mu.Unlock()
	var sb strings.Builder
	for _, r := range h.recs {
		sb.WriteString(r.Message)
		r.Attrs(func(a slog.Attr) bool {
			sb.WriteString(" " + a.Key + "=" + a.Value.String())
			return true
		})
		sb.WriteByte('\n')
	}
	return sb.String()
}

// waitFor waits until n records at level contain msg.
func (h *recordingHandler) waitFor(t *testing.T, level slog.Level, msg string, n int) []logLine {
	t.Helper()
	deadline := time.NewTimer(e2eWait)
	defer deadline.Stop()
	for {
		if l := h.lines(level, msg); len(l) >= n {
			return l
		}
		select {
		case <-h.added:
		case <-deadline.C:
			t.Fatalf("no %d %s lines %q within %s; log:\n%s", n, level, msg, e2eWait, h.all())
		}
	}
}

const (
	abandonedMsg = "dropped without being closed"
	leakMsg      = "held longer than the leak threshold"
)

// leakHandles opens dsn, leaves a *sql.Rows and a *sql.Conn open, each
// holding a backend, closes the *sql.DB and drops all three: what a test
// suite that never closes its Rows does. ctx has no Done channel:
// database/sql starts no goroutine to watch it, which would keep the Rows
// reachable until it ends. It is not inlined, so that nothing of it stays
// on the caller's stack.
//
//go:noinline
func leakHandles(t *testing.T, ctx context.Context, drv *Driver, dsn string) {
	db, err := drv.OpenDB(dsn)
	require.NoError(t, err)
	rows, err := db.QueryContext(ctx, "SELECT id FROM kv ORDER BY id")
	require.NoError(t, err)
	require.True(t, rows.Next())
	c, err := db.Conn(ctx)
	require.NoError(t, err)
	require.NoError(t, c.PingContext(ctx))
	require.NoError(t, db.Close())
}

// TestAbandonedRoutedHandlesAreReclaimed is TestAbandonedHandlesAreReclaimed
// through a {workspace} DSN: the leaked handles were the router's.
func TestAbandonedRoutedHandlesAreReclaimed(t *testing.T) {
	e := newEnv(t, 1, Config{MaxConnections: 2, MaxConnectionsPerDB: 2, AcquireTimeout: 10 * time.Second})
	ctx := WithWorkspace(context.Background(), "ws0")
	prefix := strings.TrimSuffix(e.dbs[0], "ws0")
	routed := strings.Replace(e.dsn(0), "/"+e.dbs[0]+"?", "/"+prefix+WorkspacePlaceholder+"?", 1)
	require.Contains(t, routed, WorkspacePlaceholder)
	leakHandles(t, ctx, e.drv, routed)
	require.Equal(t, 2, e.drv.Stats().InUse)
	require.Equal(t, 2, locked(e.drv.b, func() int { return e.drv.b.strays.count }))

	other, err := e.drv.OpenDB(routed)
	require.NoError(t, err)
	defer other.Close()
	var n int
	require.NoError(t, other.QueryRowContext(ctx, "SELECT count(*) FROM kv").Scan(&n))
	require.Equal(t, 10, n)
	require.Equal(t, uint64(2), e.drv.Stats().Evictions["abandoned"])
	require.Zero(t, locked(e.drv.b, func() int { return e.drv.b.strays.count }))
	e.requireQuiescent()
}

// TestAbandonedHandlesAreReclaimed leaks a *sql.Rows and a *sql.Conn, closes
// and drops their *sql.DB, and shows their backends closed and their tokens
// back while another *sql.DB of the same database waits: its query succeeds
// within the acquire timeout instead of failing. The waiting caller itself
// triggers the collection that finds the dropped handles.
func TestAbandonedHandlesAreReclaimed(t *testing.T) {
	logs := newRecordingHandler()
	const acquire = 10 * time.Second
	e, reader := newMeteredEnv(t, 1, Config{MaxConnections: 2, MaxConnectionsPerDB: 2, AcquireTimeout: acquire, Logger: slog.New(logs)})
	dsn := e.dsn(0, "workspace=ws0")

	// A *sql.DB used and closed properly: its handles' cleanups are
	// cancelled, and nothing of it is reclaimed below.
	func() {
		db, err := e.drv.OpenDB(dsn)
		require.NoError(t, err)
		queryOne(t, db)
		require.NoError(t, db.Close())
	}()

	leakHandles(t, context.Background(), e.drv, dsn)
	s := e.drv.Stats()
	require.Equal(t, 2, s.InUse, "the leaked Rows and Conn hold the budget")
	require.Equal(t, 2, s.Open)
	e.drv.b.mu.Lock()
	require.Equal(t, 2, e.drv.b.strays.count, "their handles outlive their *sql.DB")
	e.drv.b.mu.Unlock()

	other := e.open(0)
	start := time.Now()
	var n int
	require.NoError(t, other.QueryRowContext(context.Background(), "SELECT count(*) FROM kv").Scan(&n))
	waited := time.Since(start)
	require.Equal(t, 10, n)
	require.Less(t, waited, acquire)
	t.Logf("the waiting query got a backend after %s", waited)

	s = e.drv.Stats()
	require.Equal(t, uint64(2), s.Evictions["abandoned"], "the two leaked backends, and only those")
	abandoned, ok := collect(t, reader).value("tenantpg.budget.evictions", attribute.String("tenantpg.eviction.reason", "abandoned"))
	require.True(t, ok)
	require.Equal(t, int64(2), abandoned)
	require.GreaterOrEqual(t, s.Collections, uint64(1), "the waiting caller triggered a collection")
	warns := logs.waitFor(t, slog.LevelWarn, abandonedMsg, 2)
	require.Len(t, warns, 2)
	for _, w := range warns {
		require.Equal(t, "ws0", w.attrs["workspace"])
	}
	require.NotContains(t, logs.all(), testPassword)
	e.drv.b.mu.Lock()
	require.Zero(t, e.drv.b.strays.count)
	e.drv.b.mu.Unlock()
	e.requireQuiescent()
}

// TestLeakThresholdLogsHeldConnOnce holds a *sql.Conn past the leak
// threshold: one Warn line names its workspace and the stack that checked
// it out, which runs through this test; a *sql.Conn released before the
// threshold produces none.
func TestLeakThresholdLogsHeldConnOnce(t *testing.T) {
	logs := newRecordingHandler()
	const threshold = 200 * time.Millisecond
	e, reader := newMeteredEnv(t, 1, Config{MaxConnections: 3, LeakThreshold: threshold, Logger: slog.New(logs)})
	db := e.open(0)
	ctx := context.Background()

	released, err := db.Conn(ctx)
	require.NoError(t, err)
	require.NoError(t, released.PingContext(ctx))
	require.NoError(t, released.Close())

	heldSince := time.Now() // before the checkout: db.Conn may check out already
	held, err := db.Conn(ctx)
	require.NoError(t, err)
	require.NoError(t, held.PingContext(ctx))

	// The released one was checked out first: had it been reported, it
	// would have been by the time the held one is.
	warns := logs.waitFor(t, slog.LevelWarn, leakMsg, 1)
	require.Len(t, warns, 1)
	w := warns[0]
	require.Equal(t, "ws0", w.attrs["workspace"])
	require.Contains(t, w.attrs["stack"], "TestLeakThresholdLogsHeldConnOnce", "the stack of the code that checked it out")
	heldFor, err := time.ParseDuration(w.attrs["held"])
	require.NoError(t, err)
	require.GreaterOrEqual(t, heldFor, threshold)
	require.LessOrEqual(t, heldFor, time.Since(heldSince))
	require.NotContains(t, logs.all(), testPassword)
	t.Logf("stack:\n%s", w.attrs["stack"])

	// Once: the held backend is no longer watched, and nothing else is.
	e.drv.b.mu.Lock()
	watched := e.drv.b.watch.watched.len
	e.drv.b.mu.Unlock()
	require.Zero(t, watched)
	require.Equal(t, uint64(1), e.drv.Stats().SuspectedLeaks)
	leaks, ok := collect(t, reader).value("tenantpg.budget.suspected_leaks", pool("tenantpg"))
	require.True(t, ok)
	require.Equal(t, int64(1), leaks)

	require.NoError(t, held.Close())
	require.Len(t, logs.waitFor(t, slog.LevelInfo, "reported as a suspected leak was returned", 1), 1)
	require.Len(t, logs.lines(slog.LevelWarn, leakMsg), 1)
	e.requireQuiescent()
}

// TestLeakThresholdOffCapturesNothing: without a threshold no stack is
// kept and nothing is watched.
func TestLeakThresholdOffCapturesNothing(t *testing.T) {
	e := newEnv(t, 1, Config{MaxConnections: 2})
	db := e.open(0)
	c, err := db.Conn(context.Background())
	require.NoError(t, err)
	defer c.Close()
	require.NoError(t, c.PingContext(context.Background()))
	b := e.drv.b
	b.mu.Lock()
	defer b.mu.Unlock()
	for _, d := range b.poolsLocked() {
		for be := d.busy.front; be != nil; be = d.busy.next(be) {
			require.Nil(t, be.stack)
		}
	}
	require.Zero(t, b.watch.watched.len)
	require.False(t, b.watch.timer.armed)
}

// newManualBudget is a budget without a server on the state machine's
// manual clock, with one database holding n idle backends.
func newManualBudget(t *testing.T, cfg Config, n int) (*budget, *smClock, *backendPool) {
	t.Helper()
	cfg, err := cfg.normalize()
	require.NoError(t, err)
	clk := &smClock{now: smEpoch}
	b := newBudget(cfg, clk, nopIO{})
	t.Cleanup(b.close)
	b.mu.Lock()
	d := addPoolLocked(b, serverKey{}, "db", "ws", n, smEpoch)
	b.mu.Unlock()
	return b, clk, d
}

// takeIdle checks out an idle backend of d at the clock's time.
func takeIdle(t *testing.T, b *budget, d *backendPool) *backend {
	t.Helper()
	be, w, err := b.take(d, b.clock.Now(), nil)
	require.NoError(t, err)
	require.Nil(t, w, "no idle backend")
	return be
}

// fire runs the budget's timer wk, as if its time had come.
func fire(t *testing.T, b *budget, clk *smClock, wk *wakeup) {
	t.Helper()
	b.mu.Lock()
	tm, _ := wk.timer.(*smTimer)
	b.mu.Unlock()
	require.NotNil(t, tm, "never armed")
	clk.expire(tm)
	tm.f()
}

// locked reads the budget's state under its lock.
func locked[T any](b *budget, f func() T) T {
	b.mu.Lock()
	defer b.mu.Unlock()
	return f()
}

// TestLeakCheckScansInCheckoutOrder drives the leak check on a manual clock:
// it reports each backend once when its time comes, re-arms for the next
// one, forgets backends checked in, and stops when the threshold is turned
// off.
func TestLeakCheckScansInCheckoutOrder(t *testing.T) {
	logs := newRecordingHandler()
	cfg := Config{MaxConnections: 4, MaxConnectionsPerDB: 4, LeakThreshold: time.Minute, Logger: slog.New(logs)}
	b, clk, d := newManualBudget(t, cfg, 4)
	armedAt := func() time.Time {
		return locked(b, func() time.Time {
			if !b.watch.timer.armed {
				return time.Time{}
			}
			return b.watch.timer.at
		})
	}
	watched := func() int { return locked(b, func() int { return b.watch.watched.len }) }
	be1 := takeIdle(t, b, d)
	clk.set(smEpoch.Add(20 * time.Second))
	be2 := takeIdle(t, b, d)
	clk.set(smEpoch.Add(40 * time.Second))
	be3 := takeIdle(t, b, d)
	require.Equal(t, 3, watched())
	require.Equal(t, smEpoch.Add(time.Minute), armedAt(), "armed for the first checkout")

	b.checkin(be2) // returned in time: never reported
	fire(t, b, clk, &b.watch.timer)
	require.Equal(t, uint64(1), b.snapshot().counters.leaks)
	warns := logs.lines(slog.LevelWarn, leakMsg)
	require.Len(t, warns, 1)
	require.Equal(t, "ws", warns[0].attrs["workspace"])
	require.Equal(t, "1m0s", warns[0].attrs["held"])
	require.Equal(t, smEpoch.Add(100*time.Second), armedAt(), "re-armed for be3; be2 forgotten")
	require.Equal(t, 1, watched())

	// Turning the threshold off stops watching be3.
	cfg.LeakThreshold = 0
	n, err := cfg.normalize()
	require.NoError(t, err)
	require.NoError(t, b.reconfigure(n))
	fire(t, b, clk, &b.watch.timer)
	require.Zero(t, watched())
	require.True(t, armedAt().IsZero())
	require.Equal(t, uint64(1), b.snapshot().counters.leaks)
	be4 := takeIdle(t, b, d)
	require.Zero(t, watched(), "nothing is watched while it is off")

	for _, be := range []*backend{be1, be3, be4} {
		b.checkin(be)
	}
	require.Len(t, logs.lines(slog.LevelInfo, "returned"), 1, "be1 was reported, and returned")
	require.Len(t, logs.lines(slog.LevelWarn, leakMsg), 1)
	require.NoError(t, locked(b, b.checkInvariantsLocked))
}

// TestStraysTriggerBoundedCollections: while handles of a closed connector
// are open, a waiting caller triggers a collection, at most once per
// collectEvery, repeated while callers wait; none without strays or
// waiters.
func TestStraysTriggerBoundedCollections(t *testing.T) {
	b, clk, d := newManualBudget(t, Config{MaxConnections: 1, MaxConnectionsPerDB: 1}, 1)
	held := takeIdle(t, b, d) // the budget is full
	var o owner
	require.NoError(t, b.retain(d, &o))
	collections := func() uint64 { return b.snapshot().counters.collections }

	_, w, err := b.take(d, clk.Now(), nil) // waits, but no stray
	require.NoError(t, err)
	require.NotNil(t, w)
	require.Zero(t, collections())
	giveUp(t, b, w)

	b.closeOwner(nil, &o) // its *sql.DB closed: the open handle is a stray
	require.Equal(t, 1, locked(b, func() int { return b.strays.count }))
	_, w, err = b.take(d, clk.Now(), nil)
	require.NoError(t, err)
	require.Equal(t, uint64(1), collections())
	_, w2, err := b.take(d, clk.Now(), nil)
	require.NoError(t, err)
	require.Equal(t, uint64(1), collections(), "at most one a second")
	fire(t, b, clk, &b.strays.timer) // a second later, callers still waiting
	require.Equal(t, uint64(2), collections())
	require.Equal(t, smEpoch.Add(collectEvery), clk.Now())
	giveUp(t, b, w)
	giveUp(t, b, w2)
	fire(t, b, clk, &b.strays.timer) // no caller waits: no collection, not re-armed
	require.Equal(t, uint64(2), collections())
	require.False(t, locked(b, func() bool { return b.strays.timer.armed }))

	b.release(d, &o) // the handle closed, or reclaimed
	require.Zero(t, locked(b, func() int { return b.strays.count }))
	b.checkin(held)
	require.NoError(t, locked(b, b.checkInvariantsLocked))
}

// giveUp ends w's wait as a caller whose context ended.
func giveUp(t *testing.T, b *budget, w *waiter) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	_, _, err := b.await(ctx, ctx, w)
	require.ErrorIs(t, err, ErrBudgetExhausted)
}

// TestReclaimClosesTheHeldBackendOnce: the cleanup of a dropped handle
// closes its backend through the budget and releases what it retained; a
// hold whose backend was checked in has nothing to close.
func TestReclaimClosesTheHeldBackendOnce(t *testing.T) {
	b, _, d := newManualBudget(t, Config{MaxConnections: 2, MaxConnectionsPerDB: 2}, 2)
	var o owner
	h := &hold{b: b, db: d, own: &o}
	require.NoError(t, b.retain(d, &o))
	h.be.Store(takeIdle(t, b, d))
	h2 := &hold{b: b, db: d, own: &o}
	require.NoError(t, b.retain(d, &o))
	be := takeIdle(t, b, d)
	h2.be.Store(be)
	h2.be.Store(nil) // checked in by its handle
	b.checkin(be)
	b.closeOwner(nil, &o)
	require.Equal(t, 2, locked(b, func() int { return b.strays.count }))

	reclaim(h)
	s := b.snapshot()
	require.Equal(t, uint64(1), s.counters.evictions[reasonAbandoned])
	require.Equal(t, 0, s.inUse)
	require.Equal(t, 1, s.open, "closed through the budget, its token is back; the other is idle")
	reclaim(h2)
	require.Equal(t, uint64(1), b.snapshot().counters.evictions[reasonAbandoned], "nothing to close")
	require.Zero(t, locked(b, func() int { return b.strays.count }))
	require.Zero(t, locked(b, func() int { return o.handles }))
	require.Equal(t, 1, locked(b, func() int { return d.refs }))
	require.NoError(t, locked(b, b.checkInvariantsLocked))
}
