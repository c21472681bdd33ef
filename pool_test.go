package tenantpg

import (
	"context"
	"errors"
	"log/slog"
	"runtime"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// TestPoolSharesTheBudget: a Pool and a *sql.DB of the same database share
// its backends and the budget: the Pool reuses the backend database/sql
// checked in, a held PoolConn makes database/sql's callers of another
// database wait and time out, and after Release they proceed.
func TestPoolSharesTheBudget(t *testing.T) {
	e := newEnv(t, 2, Config{MaxConnections: 1, MaxConnectionsPerDB: 1, AcquireTimeout: 300 * time.Millisecond})
	ctx := context.Background()
	viaSQL := e.open(0)
	var sqlPID int
	require.NoError(t, viaSQL.QueryRowContext(ctx, "SELECT pg_backend_pid()").Scan(&sqlPID))
	require.Equal(t, uint64(1), e.drv.Stats().Dials)

	pool, err := e.drv.OpenPool(e.dsn(0, "workspace=ws0"))
	require.NoError(t, err)
	defer pool.Close()
	pc, err := pool.Acquire(ctx)
	require.NoError(t, err)
	var v string
	require.NoError(t, pc.Conn().QueryRow(ctx, "SELECT v FROM kv WHERE id = $1", 3).Scan(&v))
	require.Equal(t, "v3", v)
	require.NotEqual(t, uint32(sqlPID), pc.Conn().PgConn().PID(), "a Pool is a pool of its own: it never gets a *sql.DB's session")
	s := e.drv.Stats()
	require.Equal(t, uint64(2), s.Dials)
	require.Equal(t, uint64(1), s.Evictions["lru"], "the *sql.DB's idle backend made room in the budget of 1")

	other := e.open(1)
	var one int
	err = other.QueryRowContext(ctx, "SELECT 1").Scan(&one)
	require.ErrorIs(t, err, ErrBudgetExhausted, "the PoolConn holds the only token")

	_, err = pool.Acquire(ctx) // the database's only backend is out: wait, then time out
	var be *BudgetError
	require.True(t, errors.As(err, &be), "%v", err)
	require.Equal(t, "ws0", be.Workspace)

	pc.Release()
	pc.Release() // harmless
	queryOne(t, other)
	e.requireQuiescent()
}

// TestPoolHandsOverAndClosesWhenUnused: a backend released by a PoolConn
// makes room for a database/sql caller of another pool waiting for the
// budget (never lending it its session); a PoolConn released after its Pool
// was closed is closed, and the pool's state is forgotten.
func TestPoolHandsOverAndClosesWhenUnused(t *testing.T) {
	e := newEnv(t, 1, Config{MaxConnections: 1, MaxConnectionsPerDB: 1, AcquireTimeout: 30 * time.Second})
	ctx := context.Background()
	pool, err := e.drv.OpenPool(e.dsn(0, "workspace=ws0"))
	require.NoError(t, err)
	pc, err := pool.Acquire(ctx)
	require.NoError(t, err)

	db := e.open(0)
	done := make(chan error, 1)
	go func() {
		var one int
		done <- db.QueryRowContext(ctx, "SELECT 1").Scan(&one)
	}()
	waitForWaiters(t, e.drv, 1)
	poolPID := pc.Conn().PgConn().PID()
	pc.Release()
	require.NoError(t, <-done)
	require.Equal(t, uint64(2), e.drv.Stats().Dials, "the waiter dialed its own backend")
	require.Eventually(t, func() bool { return !pidAlive(t, e, int(poolPID)) }, e2eWait, pollEvery)

	pc, err = pool.Acquire(ctx)
	require.NoError(t, err)
	pool.Close()
	require.NoError(t, db.Close())
	_, err = pool.Acquire(ctx)
	require.ErrorIs(t, err, errPoolClosed)
	pc.Release()
	require.Eventually(t, func() bool { return e.drv.Stats().Open == 0 && e.backends() == 0 }, e2eWait, pollEvery)
	require.Equal(t, uint64(1), e.drv.Stats().Evictions["unused"])
	e.drv.b.mu.Lock()
	require.Empty(t, e.drv.b.poolsLocked())
	e.drv.b.mu.Unlock()
}

// leakPoolConn acquires a backend from p, uses it and drops the PoolConn
// without Release. It is not inlined, so that nothing of it stays on the
// caller's stack.
//
//go:noinline
func leakPoolConn(t *testing.T, ctx context.Context, p *Pool) {
	c, err := p.Acquire(ctx)
	require.NoError(t, err)
	var one int
	require.NoError(t, c.Conn().QueryRow(ctx, "SELECT 1").Scan(&one))
}

// TestAbandonedPoolConnIsReclaimed: a PoolConn dropped without Release held
// the budget's only token for good; once it is garbage its backend is
// closed (eviction reason abandoned, one Warn line naming the workspace)
// and a caller waiting on the budget proceeds, within its timeout.
func TestAbandonedPoolConnIsReclaimed(t *testing.T) {
	logs := newRecordingHandler()
	e := newEnv(t, 1, Config{MaxConnections: 1, MaxConnectionsPerDB: 1, AcquireTimeout: 5 * time.Second, Logger: slog.New(logs)})
	ctx := context.Background()
	pool, err := e.drv.OpenPool(e.dsn(0, "workspace=ws0"))
	require.NoError(t, err)
	defer pool.Close()

	leakPoolConn(t, ctx, pool)
	require.Equal(t, 1, e.drv.Stats().InUse, "the dropped PoolConn holds the only token")
	runtime.GC() // finds it; its cleanup runs on the runtime's goroutine

	c, err := pool.Acquire(ctx)
	require.NoError(t, err, "the dropped PoolConn's token came back")
	var one int
	require.NoError(t, c.Conn().QueryRow(ctx, "SELECT 1").Scan(&one))
	c.Release()
	require.Equal(t, uint64(1), e.drv.Stats().Evictions["abandoned"])
	warns := logs.waitFor(t, slog.LevelWarn, abandonedMsg, 1)
	require.Equal(t, "ws0", warns[0].attrs["workspace"])
	require.Contains(t, warns[0].msg, "PoolConn")
	e.requireQuiescent()
}

// BenchmarkPoolAcquireRelease is a PoolConn's checkout and check-in of an
// idle backend, with what it costs to be reclaimable if dropped (the hold
// and the runtime cleanup).
func BenchmarkPoolAcquireRelease(b *testing.B) {
	e := newEnv(b, 1, Config{MaxConnections: 2})
	ctx := context.Background()
	pool, err := e.drv.OpenPool(e.dsn(0))
	if err != nil {
		b.Fatal(err)
	}
	defer pool.Close()
	c, err := pool.Acquire(ctx) // the one dial
	if err != nil {
		b.Fatal(err)
	}
	c.Release()
	b.ReportAllocs()
	for b.Loop() {
		c, err := pool.Acquire(ctx)
		if err != nil {
			b.Fatal(err)
		}
		c.Release()
	}
}
