package tenantpg

// Regression tests for bugs found in review, each failing before its fix.

import (
	"context"
	"net"
	"runtime"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"go.opentelemetry.io/otel/metric"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	"go.opentelemetry.io/otel/sdk/metric/metricdata"
)

// TestCloseDoesNotDeadlockWithCollection: Driver.Close calls
// Registration.Unregister (SDK pipeline lock) while holding budget.mu; a
// collection holds the pipeline lock while the driver's callback takes
// budget.mu. No server needed.
func TestCloseDoesNotDeadlockWithCollection(t *testing.T) {
	reader := sdkmetric.NewManualReader()
	mp := sdkmetric.NewMeterProvider(sdkmetric.WithReader(reader))
	// A callback registered before the driver's runs first in a collection,
	// while the pipeline lock is held: it starts Driver.Close and gives it
	// time to take budget.mu and block in Unregister.
	var drv *Driver
	closeStarted := make(chan struct{})
	closeDone := make(chan struct{})
	m := mp.Meter("review")
	g, _ := m.Int64ObservableGauge("review.g")
	first := true
	_, err := m.RegisterCallback(func(ctx context.Context, o metric.Observer) error {
		if first {
			first = false
			go func() { close(closeStarted); drv.Close(); close(closeDone) }()
			<-closeStarted
			time.Sleep(100 * time.Millisecond)
		}
		return nil
	}, g)
	if err != nil {
		t.Fatal(err)
	}
	drv, err = NewDriver(Config{MaxConnections: 2, MaxConnectionsPerDB: 1, MeterProvider: mp})
	if err != nil {
		t.Fatal(err)
	}
	collected := make(chan struct{})
	go func() {
		var rm metricdata.ResourceMetrics
		_ = reader.Collect(context.Background(), &rm)
		close(collected)
	}()
	select {
	case <-collected:
	case <-time.After(5 * time.Second):
		t.Fatal("deadlock: Collect blocked in the driver callback on budget.mu, Driver.Close blocked in Unregister on the SDK pipeline lock")
	}
	<-closeDone
}

// TestPreparedStatementFollowsTheHandle: a statement prepared with
// db.Prepare runs on whichever backend its handle holds. When the backend it
// was prepared on is evicted, the next execution runs on a new backend,
// where pgx's statement cache prepares it again; the argument count checked
// at prepare time still applies.
func TestPreparedStatementFollowsTheHandle(t *testing.T) {
	e := newEnv(t, 2, Config{MaxConnections: 1, MaxConnectionsPerDB: 1, AcquireTimeout: 5 * time.Second})
	ctx := context.Background()
	a, b := e.open(0), e.open(1)

	st, err := a.PrepareContext(ctx, "SELECT v FROM kv WHERE id = $1")
	require.NoError(t, err)
	defer st.Close()
	var v string
	require.NoError(t, st.QueryRowContext(ctx, 4).Scan(&v))
	require.Equal(t, "v4", v)

	queryOne(t, b) // the budget is full: a's backend is evicted for b
	require.Equal(t, uint64(1), e.drv.Stats().Evictions["lru"])
	require.NoError(t, st.QueryRowContext(ctx, 5).Scan(&v))
	require.Equal(t, "v5", v)
	require.Equal(t, uint64(2), e.drv.Stats().Evictions["lru"], "b's backend made room for a's new one")

	_, err = st.ExecContext(ctx, 1, 2)
	require.ErrorContains(t, err, "expected 1 arguments, got 2")
	_, err = a.PrepareContext(ctx, "SELEKT 1")
	require.ErrorContains(t, err, "syntax error", "a bad statement fails at prepare time")
	e.requireQuiescent()
}

// TestRedialErrorReachesTheCaller: database/sql ignores any
// ResetSession error other than driver.ErrBadConn and hands the conn out
// anyway. A checkout that fails inside ResetSession must reach the caller
// through the next call, not be tried again: otherwise one query waits
// twice the acquire timeout.
func TestRedialErrorReachesTheCaller(t *testing.T) {
	const timeout = 400 * time.Millisecond
	e := newEnv(t, 2, Config{MaxConnections: 1, MaxConnectionsPerDB: 1, AcquireTimeout: timeout})
	ctx := context.Background()
	a, b := e.open(0), e.open(1)

	pinned, err := a.Conn(ctx)
	require.NoError(t, err)
	require.NoError(t, pinned.Close()) // unused, back in a's free list with needReset

	holder, err := b.Conn(ctx)
	require.NoError(t, err)
	require.NoError(t, holder.PingContext(ctx)) // holds the only token
	defer holder.Close()

	before := e.drv.Stats().Timeouts
	start := time.Now()
	var one int
	err = a.QueryRowContext(ctx, "SELECT 1").Scan(&one)
	took := time.Since(start)
	require.ErrorIs(t, err, ErrBudgetExhausted)
	t.Logf("one query waited %s with AcquireTimeout %s; timeouts counted: %d", took, timeout, e.drv.Stats().Timeouts-before)
	require.Less(t, took, timeout+timeout/2, "one query must not wait for two acquire timeouts")
}

// TestPeekDoesNotWaitForABlockedReader checks the liveness peek of a socket
// that another goroutine is blocked reading, as pgx's background reader can
// be on an idle connection: the peek must return, not wait for the reader.
func TestPeekDoesNotWaitForABlockedReader(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer ln.Close()
	accepted := make(chan net.Conn, 1)
	go func() {
		c, err := ln.Accept()
		if err == nil {
			accepted <- c
		}
		close(accepted)
	}()
	client, err := net.Dial("tcp", ln.Addr().String())
	require.NoError(t, err)
	defer client.Close()
	server := <-accepted
	require.NotNil(t, server)
	defer server.Close()

	readDone := make(chan struct{})
	go func() {
		defer close(readDone)
		var b [1]byte
		_, _ = client.Read(b[:]) // blocks, holding the read lock, until the server writes
	}()
	// The signal that the reader holds the lock: its goroutine is parked in
	// the poller's read.
	require.Eventually(t, func() bool {
		buf := make([]byte, 1<<20)
		return strings.Contains(string(buf[:runtime.Stack(buf, true)]), "internal/poll.(*FD).Read")
	}, e2eWait, pollEvery)

	s := &trackedConn{Conn: client}
	peeked := make(chan bool, 1)
	go func() { peeked <- s.peerGone() }()
	select {
	case gone := <-peeked:
		require.False(t, gone, "an open, silent connection is not gone")
	case <-time.After(e2eWait):
		t.Fatal("the peek waited for the blocked reader")
	}
	_, err = server.Write([]byte{'Z'})
	require.NoError(t, err)
	<-readDone
}

// TestLoweredIdleTimeoutRearmsTheReaper lowers ConnMaxIdleTime while no
// connection is idle: the next check-in must arm the reaper for the new
// timeout, not leave it armed for the old one (found in review).
func TestLoweredIdleTimeoutRearmsTheReaper(t *testing.T) {
	cfg, err := Config{MaxConnections: 4, ConnMaxIdleTime: 30 * time.Minute, ConnMaxLifetime: time.Hour}.normalize()
	require.NoError(t, err)
	b := newBudget(cfg, realClock{}, nopIO{})
	defer b.close()
	b.mu.Lock()
	d := addPoolLocked(b, serverKey{}, "db", "ws", 0, time.Now())
	b.mu.Unlock()
	be1, be2 := mustCheckout(t, b, d), mustCheckout(t, b, d) // both busy
	b.checkin(be1)                                           // the reaper is armed for +30m
	require.Same(t, be1, mustCheckout(t, b, d))              // nothing idle now

	cfg.ConnMaxIdleTime = time.Minute
	require.NoError(t, b.reconfigure(cfg))
	b.checkin(be2)
	b.mu.Lock()
	armed, at := b.reaper.armed, b.reaper.at
	b.mu.Unlock()
	require.True(t, armed)
	require.LessOrEqual(t, time.Until(at), time.Minute, "the reaper must run by the new idle timeout")
	b.checkin(be1)
}

// mustCheckout checks out a backend of d from a budget that runs without a
// server: an idle one, or a new one when it is granted a token.
func mustCheckout(t testing.TB, b *budget, d *backendPool) *backend {
	t.Helper()
	be, w, err := b.take(d, b.clock.Now(), nil)
	require.NoError(t, err)
	if be != nil {
		return be
	}
	ctx := context.Background()
	be, tok, err := b.await(ctx, ctx, w)
	require.NoError(t, err)
	if be != nil {
		return be
	}
	be = b.dialed(tok, &backend{}, time.Millisecond)
	require.NotNil(t, be)
	return be
}

// TestCancelledCallerDoesNotDiscardIdleBackends: a checkout pings a backend
// idle for more than pingAfter. A caller whose context has already ended
// made that ping fail without I/O, and the healthy backend was discarded as
// broken; with several idle backends the checkout loop discarded them all.
func TestCancelledCallerDoesNotDiscardIdleBackends(t *testing.T) {
	e := newEnv(t, 1, Config{MaxConnections: 3, MaxConnectionsPerDB: 3})
	pool, err := e.drv.OpenPool(e.dsn(0, "workspace=ws0"))
	require.NoError(t, err)
	defer pool.Close()
	pc, err := pool.Acquire(context.Background())
	require.NoError(t, err)
	pc.Release()
	b := e.drv.b
	b.mu.Lock()
	for _, d := range b.poolsLocked() {
		for be := d.idleBackends.front; be != nil; be = d.idleBackends.next(be) {
			be.idleSince = be.idleSince.Add(-2 * pingAfter) // long idle: the checkout pings it
		}
	}
	b.mu.Unlock()

	// database/sql checks the context before it asks for a connection; a
	// Pool does not, and a context can end between that check and the ping.
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	pc, err = pool.Acquire(ctx)
	require.NoError(t, err, "the backend is handed over unchecked")
	var one int
	require.ErrorIs(t, pc.Conn().QueryRow(ctx, "SELECT 1").Scan(&one), context.Canceled)
	pc.Release()
	s := e.drv.Stats()
	require.Zero(t, s.Evictions["broken"], "a healthy backend was discarded")
	require.Equal(t, 1, s.Open)
	pc, err = pool.Acquire(context.Background())
	require.NoError(t, err)
	pc.Release()
	require.Equal(t, uint64(1), e.drv.Stats().Dials)
	e.requireQuiescent()
}

// TestReleaseIfIdleRunsTheClosesItQueues: a router forgetting a quiet
// workspace serves its server's queue, which may choose a backend to close
// for a caller that waits; that close must run before releaseIfIdle
// returns. It released the lock without running it, leaving the backend
// closing and the caller waiting for its token until some other call
// unlocked (found by the architecture split, #21).
func TestReleaseIfIdleRunsTheClosesItQueues(t *testing.T) {
	cfg, err := Config{MaxConnections: 3, MaxConnectionsPerDB: 2, AcquireTimeout: time.Hour,
		ConnMaxIdleTime: time.Hour, ConnMaxLifetime: time.Hour}.normalize()
	require.NoError(t, err)
	clk := &smClock{now: smEpoch}
	io := &smIO{broke: map[*backend]bool{}, sockOpen: map[*backend]bool{}}
	b := newBudget(cfg, clk, io)
	io.b = b
	t.Cleanup(b.close)
	b.mu.Lock()
	spare := addPoolLocked(b, serverKey{}, "spare", "spare", 2, smEpoch) // two idle: one is spare
	grower := addPoolLocked(b, serverKey{}, "grower", "grower", 1, smEpoch)
	quiet := addPoolLocked(b, serverKey{}, "quiet", "quiet", 0, smEpoch) // a router's, with nothing
	b.mu.Unlock()
	takeIdle(t, b, grower) // the budget is full

	// A second caller of grower waits; its patience (nothing measured: at
	// once) makes it seek a token, but the spare backend has not been idle
	// for spareIdleAfter yet: nothing is evicted for growth.
	_, w, err := b.take(grower, clk.Now(), nil)
	require.NoError(t, err)
	require.NotNil(t, w)
	b.mu.Lock()
	pt, _ := w.patience.(*smTimer)
	b.mu.Unlock()
	require.NotNil(t, pt)
	clk.expire(pt)
	pt.f()
	require.True(t, locked(b, w.seeking))
	require.Empty(t, io.takeClosed())

	// Later the spare backend is old enough; the next event on the server
	// is the router letting the quiet workspace go.
	clk.set(smEpoch.Add(2 * spareIdleAfter))
	require.True(t, b.releaseIfIdle(quiet))
	closed := io.takeClosed()
	require.Len(t, closed, 1, "the backend evicted for the waiter is closed before releaseIfIdle returns")
	require.Same(t, spare, closed[0].db)
	require.NoError(t, locked(b, b.checkInvariantsLocked))
}

// TestDialFailedAfterItsPoolClosed: a Pool closed while one of its Acquires
// dials leaves the dial's token as all that keeps the pool's state; a dial
// that then fails without having opened a socket gives the token back at
// once, the pool is forgotten, and the failure's bookkeeping must not reach
// for the pool's server through it. It did, and panicked on a nil server
// (found by the architecture split, #21).
func TestDialFailedAfterItsPoolClosed(t *testing.T) {
	cfg, err := Config{MaxConnections: 2, AcquireTimeout: time.Hour}.normalize()
	require.NoError(t, err)
	b := newBudget(cfg, &smClock{now: smEpoch}, nopIO{})
	b.mu.Lock()
	d := addPoolLocked(b, serverKey{}, "db", "ws", 0, smEpoch) // the connector's reference
	b.mu.Unlock()
	_, w, err := b.take(d, b.clock.Now(), nil)
	require.NoError(t, err)
	ctx := context.Background()
	_, tok, err := b.await(ctx, ctx, w)
	require.NoError(t, err)
	require.NotNil(t, tok, "it dials")
	b.closeOwner(d, &owner{}) // Pool.Close: no handle of a Pool holds the pool
	b.dialFailed(tok, dialDown, &net.OpError{Op: "dial", Net: "tcp", Err: syscall.ECONNREFUSED})
	require.Zero(t, b.snapshot().open)
	require.Empty(t, locked(b, func() int { return len(b.poolsLocked()) }), "forgotten")
	require.NoError(t, locked(b, b.checkInvariantsLocked))
	b.close() // not deferred: a panic under the lock would hang it
}
