package tenantpg

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"errors"
	"os"
	"runtime/pprof"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/stretchr/testify/require"
)

func queryOne(t testing.TB, db *sql.DB) {
	t.Helper()
	var one int
	require.NoError(t, db.QueryRowContext(context.Background(), "SELECT 1").Scan(&one))
}

func dbStats(s Stats, workspace string) DatabaseStats {
	for _, d := range s.Databases {
		if d.Workspace == workspace {
			return d
		}
	}
	return DatabaseStats{Workspace: workspace}
}

// waitForWaiters blocks until n callers wait for a token: Stats is the
// signal, polled.
func waitForWaiters(t testing.TB, drv *Driver, n int) {
	t.Helper()
	require.Eventually(t, func() bool { return drv.Stats().Waiting == n }, 10*time.Second, time.Millisecond)
}

func TestLRUEvictsLeastRecentlyUsedDatabase(t *testing.T) {
	e := newEnv(t, 4, Config{MaxConnections: 3, MaxConnectionsPerDB: 1})
	dbs := []*sql.DB{e.open(0), e.open(1), e.open(2), e.open(3)}
	queryOne(t, dbs[0])
	queryOne(t, dbs[1])
	queryOne(t, dbs[2])
	queryOne(t, dbs[0]) // ws0 is now more recent than ws1 and ws2
	queryOne(t, dbs[3]) // the budget is full: ws1's connection must go

	s := e.drv.Stats()
	require.Equal(t, 0, dbStats(s, "ws1").Open, "the least recently used database keeps its connection: %+v", s.Databases)
	for _, ws := range []string{"ws0", "ws2", "ws3"} {
		require.Equal(t, 1, dbStats(s, ws).Open, ws)
	}
	require.Equal(t, uint64(1), s.Evictions["lru"])

	queryOne(t, dbs[1]) // now ws2 is the least recently used
	s = e.drv.Stats()
	require.Equal(t, 0, dbStats(s, "ws2").Open, "%+v", s.Databases)
	e.requireQuiescent()
}

// TestEvictionSparesBusyConnections holds every token in a pinned
// connection, an open transaction and an open result set: a caller for
// another database must wait and time out rather than take any of them.
func TestEvictionSparesBusyConnections(t *testing.T) {
	e := newEnv(t, 4, Config{MaxConnections: 3, MaxConnectionsPerDB: 1, AcquireTimeout: 300 * time.Millisecond})
	ctx := context.Background()
	pinnedDB, txDB, rowsDB, other := e.open(0), e.open(1), e.open(2), e.open(3)

	pinned, err := pinnedDB.Conn(ctx)
	require.NoError(t, err)
	defer pinned.Close()
	require.NoError(t, pinned.PingContext(ctx))
	tx, err := txDB.BeginTx(ctx, nil)
	require.NoError(t, err)
	defer tx.Rollback()
	_, err = tx.ExecContext(ctx, "UPDATE kv SET v = 'in-tx' WHERE id = 1")
	require.NoError(t, err)
	rows, err := rowsDB.QueryContext(ctx, "SELECT id FROM kv ORDER BY id")
	require.NoError(t, err)
	defer rows.Close()
	require.True(t, rows.Next())

	var one int
	err = other.QueryRowContext(ctx, "SELECT 1").Scan(&one)
	require.ErrorIs(t, err, ErrBudgetExhausted)

	// Every busy connection still works and the transaction still holds.
	require.NoError(t, pinned.QueryRowContext(ctx, "SELECT 1").Scan(&one))
	var v string
	require.NoError(t, tx.QueryRowContext(ctx, "SELECT v FROM kv WHERE id = 1").Scan(&v))
	require.Equal(t, "in-tx", v)
	n := 1
	for rows.Next() {
		n++
	}
	require.NoError(t, rows.Err())
	require.Equal(t, 10, n)
	require.NoError(t, tx.Commit())
	s := e.drv.Stats()
	require.Zero(t, s.Evictions["lru"]+s.Evictions["handoff"])
	require.Equal(t, uint64(1), s.Timeouts)

	// Once they are returned, the other database gets a connection.
	require.NoError(t, rows.Close())
	queryOne(t, other)
	require.NoError(t, pinned.Close())
	e.requireQuiescent()
}

// TestWaitersAreServedInArrivalOrder holds the only token and queues three
// callers one after another; each released token goes to the oldest.
func TestWaitersAreServedInArrivalOrder(t *testing.T) {
	e := newEnv(t, 4, Config{MaxConnections: 1, MaxConnectionsPerDB: 1})
	ctx := context.Background()
	holder := e.open(0)
	pinned, err := holder.Conn(ctx)
	require.NoError(t, err)
	require.NoError(t, pinned.PingContext(ctx))

	var mu sync.Mutex
	var order []int
	var wg sync.WaitGroup
	for i := 1; i <= 3; i++ {
		db := e.open(i)
		db.SetMaxIdleConns(0) // each gives its token back as soon as it is done
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			var one int
			err := db.QueryRowContext(ctx, "SELECT 1").Scan(&one)
			mu.Lock()
			order = append(order, i)
			mu.Unlock()
			require.NoError(t, err)
		}(i)
		waitForWaiters(t, e.drv, i)
	}
	require.NoError(t, pinned.Close())
	wg.Wait()
	require.Equal(t, []int{1, 2, 3}, order)
	require.Equal(t, uint64(3), e.drv.Stats().WaitCount)
	e.requireQuiescent()
}

func TestWaitEndsWithTypedErrors(t *testing.T) {
	e := newEnv(t, 2, Config{MaxConnections: 1, MaxConnectionsPerDB: 1, AcquireTimeout: 200 * time.Millisecond})
	ctx := context.Background()
	holder, waiterDB := e.open(0), e.open(1)
	pinned, err := holder.Conn(ctx)
	require.NoError(t, err)
	require.NoError(t, pinned.PingContext(ctx))

	t.Run("acquire timeout", func(t *testing.T) {
		start := time.Now()
		var one int
		err := waiterDB.QueryRowContext(ctx, "SELECT 1").Scan(&one)
		require.ErrorIs(t, err, ErrBudgetExhausted)
		var be *BudgetError
		require.ErrorAs(t, err, &be)
		require.Equal(t, "ws1", be.Workspace)
		require.Equal(t, e.dbs[1], be.Database)
		require.Equal(t, 1, be.Open)
		require.Equal(t, 1, be.Limit)
		require.Equal(t, 0, be.DatabaseOpen)
		require.Equal(t, 1, be.DatabaseCap)
		require.GreaterOrEqual(t, be.Waited, 200*time.Millisecond)
		require.GreaterOrEqual(t, time.Since(start), 200*time.Millisecond)
		require.Nil(t, be.Err, "the driver's own timeout is not the caller's context")
		require.NotContains(t, err.Error(), testPassword)
	})
	t.Run("caller cancels", func(t *testing.T) {
		cctx, cancel := context.WithCancel(ctx)
		errc := make(chan error, 1)
		go func() {
			var one int
			errc <- waiterDB.QueryRowContext(cctx, "SELECT 1").Scan(&one)
		}()
		waitForWaiters(t, e.drv, 1)
		cancel()
		err := <-errc
		require.ErrorIs(t, err, context.Canceled)
		require.ErrorIs(t, err, ErrBudgetExhausted)
	})
	t.Run("caller deadline", func(t *testing.T) {
		dctx, cancel := context.WithTimeout(ctx, 50*time.Millisecond)
		defer cancel()
		var one int
		err := waiterDB.QueryRowContext(dctx, "SELECT 1").Scan(&one)
		require.ErrorIs(t, err, context.DeadlineExceeded)
	})
	s := e.drv.Stats()
	require.Zero(t, s.Waiting, "no waiter may be left behind")
	require.Equal(t, 1, s.Open, "no token may leak: only the pinned connection holds one")
	require.NoError(t, pinned.Close())
	queryOne(t, waiterDB)
	e.requireQuiescent()
}

// TestPerDatabaseCapHolds opens one database through three *sql.DB without
// limits of their own and runs twelve slow queries at once: the driver must
// keep the database at its cap and queue the rest.
func TestPerDatabaseCapHolds(t *testing.T) {
	e := newEnv(t, 1, Config{MaxConnections: 10, MaxConnectionsPerDB: 3, AcquireTimeout: 30 * time.Second})
	// One pool: the cap is a pool's, as pgxpool's MaxConns is
	// (TestIsolationPerPoolCap has two pools of one database).
	c, err := e.drv.OpenConnector(e.dsn(0, "workspace=capped"))
	require.NoError(t, err)
	h := sql.OpenDB(c)
	t.Cleanup(func() { h.Close() })
	sampler := e.samplePeak()
	var maxOpen atomic.Int64
	stop := make(chan struct{})
	var watch sync.WaitGroup
	watch.Add(1)
	go func() {
		defer watch.Done()
		for {
			select {
			case <-stop:
				return
			default:
			}
			if o := int64(dbStats(e.drv.Stats(), "capped").Open); o > maxOpen.Load() {
				maxOpen.Store(o)
			}
			time.Sleep(time.Millisecond)
		}
	}()
	var errs errCollector
	var wg sync.WaitGroup
	for i := 0; i < 12; i++ {
		wg.Add(1)
		go func(h *sql.DB) {
			defer wg.Done()
			_, err := h.ExecContext(context.Background(), "SELECT pg_sleep(0.1)")
			errs.add(err)
		}(h)
	}
	wg.Wait()
	close(stop)
	watch.Wait()
	peak, _ := sampler.Stop()
	require.Empty(t, errs.list())
	require.LessOrEqual(t, peak, 3, "server-side connections for the database")
	require.LessOrEqual(t, maxOpen.Load(), int64(3))
	require.Greater(t, e.drv.Stats().WaitCount, uint64(0), "callers beyond the cap must have waited")
	e.requireQuiescent()
}

// TestReservedConnections gives the system database one reserved
// connection: with the shared pool full of busy connections it still gets
// one at once, and no other database can take it.
func TestReservedConnections(t *testing.T) {
	e := newEnv(t, 4, Config{MaxConnections: 3, MaxConnectionsPerDB: 2, AcquireTimeout: 200 * time.Millisecond})
	ctx := context.Background()
	system, err := e.drv.OpenDB(e.dsn(0, "workspace=system", "pool_reserved_conns=1"))
	require.NoError(t, err)
	defer system.Close()
	a, b, c := e.open(1), e.open(2), e.open(3)

	require.Equal(t, 1, e.drv.Stats().Reserved)
	ca, err := a.Conn(ctx)
	require.NoError(t, err)
	defer ca.Close()
	cb, err := b.Conn(ctx)
	require.NoError(t, err)
	defer cb.Close()
	require.NoError(t, ca.PingContext(ctx))
	require.NoError(t, cb.PingContext(ctx))

	// The shared pool (3 - 1 reserved) is full of busy connections.
	var one int
	err = c.QueryRowContext(ctx, "SELECT 1").Scan(&one)
	require.ErrorIs(t, err, ErrBudgetExhausted, "the reserved connection must not go to another database")

	start := time.Now()
	queryOne(t, system)
	require.Less(t, time.Since(start), 150*time.Millisecond, "the system database must not wait for its reserved connection")
	s := e.drv.Stats()
	require.Equal(t, 1, dbStats(s, "system").Open)
	require.Equal(t, 3, s.Open)

	// A reservation that does not fit the budget is refused.
	_, err = e.drv.OpenConnector(e.dsn(1, "workspace=greedy", "pool_reserved_conns=3"))
	var de *DSNError
	require.ErrorAs(t, err, &de)
	require.Contains(t, err.Error(), "pool_reserved_conns")
	require.NoError(t, ca.Close())
	require.NoError(t, cb.Close())
	e.requireQuiescent()
}

// TestConfigureShrinksUnderLoad lowers the budget from 12 to 3 while 16
// goroutines run queries over 8 databases: no caller sees an error, no busy
// connection is closed under a caller, and the driver and the server settle
// at the new limit.
func TestConfigureShrinksUnderLoad(t *testing.T) {
	e := newEnv(t, 8, Config{MaxConnections: 12, MaxConnectionsPerDB: 3, AcquireTimeout: 30 * time.Second})
	dbs := make([]*sql.DB, 8)
	for i := range dbs {
		dbs[i] = e.open(i)
	}
	var errs errCollector
	var ops atomic.Int64
	stop := readLoad(dbs, 16, &ops, &errs)
	require.Eventually(t, func() bool { return ops.Load() > 200 }, 30*time.Second, time.Millisecond)
	require.NoError(t, e.drv.Configure(Config{MaxConnections: 3, MaxConnectionsPerDB: 3, AcquireTimeout: 30 * time.Second}))
	// Give the shrink a moment under load, then let the load finish.
	before := ops.Load()
	if !assertEventually(func() bool { return ops.Load() > before+200 }, 30*time.Second) {
		pprof.Lookup("goroutine").WriteTo(os.Stderr, 1)
		t.Fatalf("no progress after the shrink:\n%s", e.drv.dumpState())
	}
	stop()
	require.Empty(t, errs.list())
	s := e.drv.Stats()
	require.Equal(t, 3, s.Limit)
	require.LessOrEqual(t, s.Open, 3)
	require.Greater(t, s.Evictions["budget_shrink"], uint64(0))
	e.requireQuiescent()
	require.LessOrEqual(t, e.backends(), 3)

	require.Error(t, e.drv.Configure(Config{MaxConnections: -1}))
	require.Error(t, e.drv.Configure(Config{MaxConnections: 2, MaxConnectionsPerDB: 3}))
}

func TestIdleTimeoutAndLifetimeReturnTokens(t *testing.T) {
	t.Run("idle timeout", func(t *testing.T) {
		e := newEnv(t, 2, Config{MaxConnections: 4, ConnMaxIdleTime: 150 * time.Millisecond})
		c, err := e.drv.OpenConnector(e.dsn(0, "workspace=idle"))
		require.NoError(t, err)
		db := sql.OpenDB(c) // database/sql's own idle limit is off: the driver must act alone
		defer db.Close()
		queryOne(t, db)
		require.Equal(t, 1, e.drv.Stats().Open)
		require.Eventually(t, func() bool { return e.drv.Stats().Open == 0 && e.backends() == 0 }, 10*time.Second, 5*time.Millisecond)
		require.Equal(t, uint64(1), e.drv.Stats().Evictions["idle_timeout"])
		queryOne(t, db) // database/sql retries past the connection the driver closed
		e.requireQuiescent()
	})
	t.Run("lifetime", func(t *testing.T) {
		e := newEnv(t, 1, Config{MaxConnections: 4, ConnMaxLifetime: 200 * time.Millisecond, ConnMaxIdleTime: time.Hour})
		c, err := e.drv.OpenConnector(e.dsn(0, "workspace=life"))
		require.NoError(t, err)
		db := sql.OpenDB(c)
		defer db.Close()
		db.SetMaxOpenConns(1)
		// Busy the whole time: closed at check-in once past its lifetime.
		deadline := time.Now().Add(5 * time.Second)
		for e.drv.Stats().Evictions["lifetime"] == 0 && time.Now().Before(deadline) {
			queryOne(t, db)
		}
		require.GreaterOrEqual(t, e.drv.Stats().Evictions["lifetime"], uint64(1))
		// Idle: closed by the reaper.
		require.Eventually(t, func() bool { return e.drv.Stats().Open == 0 }, 10*time.Second, 5*time.Millisecond)
		e.requireQuiescent()
	})
}

// TestServerRejectionReturnsToken points the driver at a role whose
// CONNECTION LIMIT (1) is below the budget (4): the second dial is refused by
// the server with SQLSTATE 53300.
func TestServerRejectionReturnsToken(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t, 2, Config{MaxConnections: 4, MaxConnectionsPerDB: 2, AcquireTimeout: 2 * time.Second})
	e.setRoleLimit(1)
	a, b := e.open(0), e.open(1)
	ca, err := a.Conn(ctx)
	require.NoError(t, err)
	defer ca.Close()
	require.NoError(t, ca.PingContext(ctx))

	var one int
	err = b.QueryRowContext(ctx, "SELECT 1").Scan(&one)
	require.Error(t, err)
	var ce *ConnectError
	require.ErrorAs(t, err, &ce)
	require.Equal(t, "ws1", ce.Workspace)
	require.GreaterOrEqual(t, ce.Attempts, 1, "the driver retries a refusal until the deadline")
	require.Contains(t, err.Error(), "for lack of connection slots")
	var pgErr *pgconn.PgError
	require.ErrorAs(t, err, &pgErr)
	require.Equal(t, "53300", pgErr.Code)
	require.Contains(t, err.Error(), `workspace "ws1"`)
	require.NotContains(t, err.Error(), testPassword)
	s := e.drv.Stats()
	require.GreaterOrEqual(t, s.DialErrors["rejected"], uint64(1))
	require.NoError(t, ca.Close())
	e.requireQuiescent()
	require.Equal(t, 1, e.drv.Stats().Open, "only the first connection holds a token")
}

func TestDriverCloseAndForget(t *testing.T) {
	e := newEnv(t, 2, Config{MaxConnections: 1, MaxConnectionsPerDB: 1, AcquireTimeout: 30 * time.Second})
	ctx := context.Background()

	// Driver.Open, used directly.
	dc, err := e.drv.Open(e.dsn(0))
	require.NoError(t, err)
	require.Equal(t, 0, e.drv.Stats().Open, "a handle dials nothing until it is used")
	require.NoError(t, dc.(driver.Pinger).Ping(ctx))
	require.Equal(t, 1, e.drv.Stats().Open)
	require.NoError(t, dc.Close())
	require.Eventually(t, func() bool { return e.drv.Stats().Open == 0 }, 5*time.Second, time.Millisecond)
	e.drv.b.mu.Lock()
	require.Empty(t, e.drv.b.poolsLocked(), "a database with no connector and no connection must be forgotten")
	e.drv.b.mu.Unlock()

	holder, waiterDB := e.open(0), e.open(1)
	pinned, err := holder.Conn(ctx)
	require.NoError(t, err)
	require.NoError(t, pinned.PingContext(ctx))
	errc := make(chan error, 1)
	go func() {
		var one int
		errc <- waiterDB.QueryRowContext(ctx, "SELECT 1").Scan(&one)
	}()
	waitForWaiters(t, e.drv, 1)
	require.NoError(t, e.drv.Close())
	require.ErrorIs(t, <-errc, errDriverClosed)
	// The pinned connection keeps working until it is returned...
	require.NoError(t, pinned.PingContext(ctx))
	require.NoError(t, pinned.Close())
	// ...and is closed then.
	require.Eventually(t, func() bool { return e.drv.Stats().Open == 0 && e.backends() == 0 }, 5*time.Second, time.Millisecond)
	_, err = e.drv.OpenConnector(e.dsn(0))
	require.ErrorIs(t, err, errDriverClosed)
	require.NoError(t, e.drv.Close(), "a second Close is harmless")

	require.NoError(t, holder.Close())
	require.NoError(t, waiterDB.Close())
	e.drv.b.mu.Lock()
	require.Empty(t, e.drv.b.poolsLocked())
	e.drv.b.mu.Unlock()
}

// TestPreparedStatementsSurviveEviction prepares a statement on a *sql.DB,
// lets the driver evict the connection it was prepared on, and uses and
// closes the statement: database/sql re-prepares on a new connection and the
// close of the evicted one is harmless.
func TestPreparedStatementsSurviveEviction(t *testing.T) {
	e := newEnv(t, 2, Config{MaxConnections: 1, MaxConnectionsPerDB: 1})
	ctx := context.Background()
	a, b := e.open(0), e.open(1)
	st, err := a.PrepareContext(ctx, "SELECT v FROM kv WHERE id = $1")
	require.NoError(t, err)
	var v string
	require.NoError(t, st.QueryRowContext(ctx, 4).Scan(&v))
	queryOne(t, b) // evicts a's connection
	require.Equal(t, uint64(1), e.drv.Stats().Evictions["lru"])
	require.NoError(t, st.QueryRowContext(ctx, 5).Scan(&v))
	require.Equal(t, "v5", v)
	require.NoError(t, st.Close())
	e.requireQuiescent()
}

func TestRawGivesPgxAndStaysBusy(t *testing.T) {
	e := newEnv(t, 3, Config{MaxConnections: 2, MaxConnectionsPerDB: 1, AcquireTimeout: 300 * time.Millisecond})
	ctx := context.Background()
	a, b, c := e.open(0), e.open(1), e.open(2)
	conn, err := a.Conn(ctx)
	require.NoError(t, err)
	defer conn.Close()
	err = conn.Raw(func(dc any) error {
		pc, err := PgxConn(dc)
		if err != nil {
			return err
		}
		if _, err := pc.Exec(ctx, "CREATE TEMP TABLE copied (n int)"); err != nil {
			return err
		}
		rows := make([][]any, 10000)
		for i := range rows {
			rows[i] = []any{i}
		}
		n, err := pc.CopyFrom(ctx, []string{"copied"}, []string{"n"}, pgxRows(rows))
		if err != nil {
			return err
		}
		if n != 10000 {
			return errors.New("short copy")
		}
		// While the *pgx.Conn is in use, two other databases compete for
		// the one remaining token: the pinned connection is never taken.
		queryOne(t, b)
		queryOne(t, c)
		var count int
		return pc.QueryRow(ctx, "SELECT count(*) FROM copied").Scan(&count)
	})
	require.NoError(t, err)
	require.Equal(t, 1, dbStats(e.drv.Stats(), "ws0").Open)
	_, err = PgxConn("not a connection")
	require.Error(t, err)
	require.NoError(t, conn.Close())
	e.requireQuiescent()
}

func pgxRows(rows [][]any) *pgxCopySource { return &pgxCopySource{rows: rows, i: -1} }

type pgxCopySource struct {
	rows [][]any
	i    int
}

func (s *pgxCopySource) Next() bool             { s.i++; return s.i < len(s.rows) }
func (s *pgxCopySource) Values() ([]any, error) { return s.rows[s.i], nil }
func (s *pgxCopySource) Err() error             { return nil }

// TestHandleHoldsNothingUntilUsed pins a handle with db.Conn: it holds no
// backend and no token until its first call, so another database can use
// the whole budget meanwhile.
func TestHandleHoldsNothingUntilUsed(t *testing.T) {
	e := newEnv(t, 2, Config{MaxConnections: 1, MaxConnectionsPerDB: 1, AcquireTimeout: 5 * time.Second})
	ctx := context.Background()
	a, b := e.open(0), e.open(1)
	pinned, err := a.Conn(ctx)
	require.NoError(t, err)
	defer pinned.Close()
	require.Zero(t, e.drv.Stats().Open)

	queryOne(t, b) // the only token, free
	require.Zero(t, e.drv.Stats().Evictions["lru"])

	var v string
	require.NoError(t, pinned.QueryRowContext(ctx, "SELECT v FROM kv WHERE id = 7").Scan(&v))
	require.Equal(t, "v7", v)
	require.Equal(t, uint64(1), e.drv.Stats().Evictions["lru"], "b's idle backend made room")
	require.NoError(t, pinned.Close())
	e.requireQuiescent()
}
