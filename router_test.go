package tenantpg

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/tenantpg/tenantpg/internal/pgtest"
)

// routedDSN is a {workspace} DSN for the env's databases: workspace "wsI"
// is database e.dbs[I].
func (e *env) routedDSN(params ...string) string {
	u := e.srv.URL(e.role, testPassword, strings.TrimSuffix(e.dbs[0], ws(0))+WorkspacePlaceholder)
	for _, p := range params {
		u += "&" + p
	}
	return u
}

func (e *env) openRouted(params ...string) *sql.DB {
	e.t.Helper()
	db, err := e.drv.OpenDB(e.routedDSN(params...))
	require.NoError(e.t, err)
	e.t.Cleanup(func() { db.Close() })
	return db
}

func ws(i int) string { return fmt.Sprintf("ws%d", i) }

func currentDB(t *testing.T, ctx context.Context, q interface {
	QueryRowContext(context.Context, string, ...any) *sql.Row
}) string {
	t.Helper()
	var name string
	require.NoError(t, q.QueryRowContext(ctx, "SELECT current_database()").Scan(&name))
	return name
}

// TestRoutedDBServesEveryWorkspace interleaves workspaces on one *sql.DB in
// one goroutine: each call reaches the database its context names.
func TestRoutedDBServesEveryWorkspace(t *testing.T) {
	e := newEnv(t, 3, Config{MaxConnections: 4})
	db := e.openRouted()
	bg := context.Background()
	for round := 0; round < 3; round++ {
		for i := range e.dbs {
			require.Equal(t, e.dbs[i], currentDB(t, WithWorkspace(bg, ws(i)), db))
		}
	}
	s := e.drv.Stats()
	require.Len(t, s.Databases, 3)
	for _, d := range s.Databases {
		require.Regexp(t, `^ws\d$`, d.Workspace, "the workspace label is the context's id")
	}
	e.requireQuiescent()
}

// TestRoutedDBRequiresAWorkspace: a call whose context names no workspace
// fails with ErrNoWorkspace and opens nothing.
func TestRoutedDBRequiresAWorkspace(t *testing.T) {
	e := newEnv(t, 1, Config{MaxConnections: 2})
	db := e.openRouted()
	var n int
	err := db.QueryRowContext(context.Background(), "SELECT 1").Scan(&n)
	require.ErrorIs(t, err, ErrNoWorkspace)
	_, err = db.ExecContext(context.Background(), "SELECT 1")
	require.ErrorIs(t, err, ErrNoWorkspace)
	_, err = db.BeginTx(context.Background(), nil)
	require.ErrorIs(t, err, ErrNoWorkspace)
	require.Zero(t, e.drv.Stats().Open, "nothing may be dialed for a call without a workspace")
	require.Zero(t, e.backends())

	err = db.PingContext(WithWorkspace(context.Background(), "no_such"))
	var ce *ConnectError
	require.ErrorAs(t, err, &ce, "a workspace without a database fails at its dial")
	require.Equal(t, "no_such", ce.Workspace)
	require.NotContains(t, err.Error(), testPassword)
	e.requireQuiescent()
}

// TestRoutedPinnedWorkStaysOnItsWorkspace: transactions, *sql.Conn and Raw
// keep the workspace they started on; a call naming another fails with
// WorkspaceMismatchError, and one naming none stays put.
func TestRoutedPinnedWorkStaysOnItsWorkspace(t *testing.T) {
	e := newEnv(t, 2, Config{MaxConnections: 4})
	db := e.openRouted()
	bg := context.Background()
	ctxA, ctxB := WithWorkspace(bg, ws(0)), WithWorkspace(bg, ws(1))

	tx, err := db.BeginTx(ctxA, nil)
	require.NoError(t, err)
	_, err = tx.ExecContext(ctxA, "UPDATE kv SET v = 'tx' WHERE id = 1")
	require.NoError(t, err)
	require.Equal(t, e.dbs[0], currentDB(t, bg, tx), "a call naming no workspace stays on the transaction's")
	var mismatch *WorkspaceMismatchError
	_, err = tx.ExecContext(ctxB, "UPDATE kv SET v = 'wrong' WHERE id = 1")
	require.ErrorAs(t, err, &mismatch)
	require.Equal(t, WorkspaceMismatchError{Bound: ws(0), Requested: ws(1)}, *mismatch)
	require.NoError(t, tx.Commit())
	var v string
	require.NoError(t, db.QueryRowContext(ctxA, "SELECT v FROM kv WHERE id = 1").Scan(&v))
	require.Equal(t, "tx", v)
	require.NoError(t, db.QueryRowContext(ctxB, "SELECT v FROM kv WHERE id = 1").Scan(&v))
	require.Equal(t, "v1", v, "workspace B's row is untouched")

	// A *sql.Conn taken under B's context is on B for every call and for Raw.
	c, err := db.Conn(ctxB)
	require.NoError(t, err)
	require.Equal(t, e.dbs[1], currentDB(t, bg, c))
	require.NoError(t, c.Raw(func(dc any) error {
		pc, err := PgxConn(dc)
		if err != nil {
			return err
		}
		return pc.QueryRow(bg, "SELECT current_database()").Scan(&v)
	}))
	require.Equal(t, e.dbs[1], v)
	require.ErrorAs(t, c.PingContext(ctxA), &mismatch)
	require.NoError(t, c.Close())

	// After the *sql.Conn is returned its handle serves A again.
	require.Equal(t, e.dbs[0], currentDB(t, ctxA, db))
	e.requireQuiescent()
}

// TestRoutedPreparedStatements: a statement prepared before any workspace
// runs on each workspace its callers name; one prepared under a workspace is
// checked there.
func TestRoutedPreparedStatements(t *testing.T) {
	e := newEnv(t, 2, Config{MaxConnections: 4})
	db := e.openRouted()
	bg := context.Background()
	_, err := db.ExecContext(WithWorkspace(bg, ws(1)), "UPDATE kv SET v = 'B' || id")
	require.NoError(t, err)

	st, err := db.Prepare("SELECT current_database(), v FROM kv WHERE id = $1")
	require.NoError(t, err, "db.Prepare at start-up needs no workspace")
	defer st.Close()
	for round := 0; round < 3; round++ {
		for i, want := range []string{"v3", "B3"} {
			var name, v string
			require.NoError(t, st.QueryRowContext(WithWorkspace(bg, ws(i)), 3).Scan(&name, &v))
			require.Equal(t, e.dbs[i], name)
			require.Equal(t, want, v)
		}
	}
	var n int
	require.ErrorIs(t, st.QueryRowContext(bg, 3).Scan(&n), ErrNoWorkspace)

	_, err = db.PrepareContext(WithWorkspace(bg, ws(0)), "SELEC broken")
	require.Error(t, err, "a statement prepared under a workspace is checked by the server at once")
	e.requireQuiescent()
}

// TestRoutedDBSharesTheBudget: many goroutines over more workspaces than
// the budget holds, all on one *sql.DB: every answer comes from the right
// database and the server never sees more than the budget.
func TestRoutedDBSharesTheBudget(t *testing.T) {
	const budget, workspaces, workers, rounds = 3, 6, 8, 40
	e := newEnv(t, workspaces, Config{MaxConnections: budget, MaxConnectionsPerDB: 2, AcquireTimeout: 20 * time.Second})
	db := e.openRouted()
	peak := e.samplePeak()
	var errs errCollector
	var wg sync.WaitGroup
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for r := 0; r < rounds; r++ {
				i := (w + r) % workspaces
				var name string
				err := db.QueryRowContext(WithWorkspace(context.Background(), ws(i)), "SELECT current_database()").Scan(&name)
				if err == nil && name != e.dbs[i] {
					err = fmt.Errorf("workspace %s answered from %s", ws(i), name)
				}
				errs.add(err)
			}
		}()
	}
	wg.Wait()
	require.Empty(t, errs.list())
	max, _ := peak.Stop()
	require.LessOrEqual(t, max, budget)
	e.requireQuiescent()
}

// TestRoutedCloseForgetsEveryWorkspace: closing the routed *sql.DB closes
// every workspace's idle backends and drops their state.
func TestRoutedCloseForgetsEveryWorkspace(t *testing.T) {
	e := newEnv(t, 3, Config{MaxConnections: 4})
	db, err := e.drv.OpenDB(e.routedDSN())
	require.NoError(t, err)
	for i := range e.dbs {
		currentDB(t, WithWorkspace(context.Background(), ws(i)), db)
	}
	require.Equal(t, 3, e.drv.Stats().Open)
	require.NoError(t, db.Close())
	require.Eventually(t, func() bool { return e.drv.Stats().Open == 0 && e.backends() == 0 }, e2eWait, pollEvery)
	require.Empty(t, e.drv.Stats().Databases)
}

// TestRoutedResolver: the resolver maps ids the pattern does not; an empty
// answer keeps the pattern, and its error reaches the caller with the id.
func TestRoutedResolver(t *testing.T) {
	e := newEnv(t, 3, Config{MaxConnections: 4})
	var calls sync.Map
	require.NoError(t, e.drv.Configure(Config{MaxConnections: 4, ResolveWorkspace: func(_ context.Context, id string) (string, error) {
		n, _ := calls.LoadOrStore(id, new(int))
		*n.(*int)++
		switch id {
		case "acme":
			return e.dsn(2), nil
		case "banned":
			return "", errors.New("workspace suspended")
		}
		return "", nil
	}}))
	db := e.openRouted()
	bg := context.Background()
	for range 2 {
		require.Equal(t, e.dbs[2], currentDB(t, WithWorkspace(bg, "acme"), db))
		require.Equal(t, e.dbs[0], currentDB(t, WithWorkspace(bg, ws(0)), db))
	}
	n, _ := calls.Load("acme")
	require.Equal(t, 1, *n.(*int), "a resolution is kept for the life of the *sql.DB")
	var name string
	err := db.QueryRowContext(WithWorkspace(bg, "banned"), "SELECT 1").Scan(&name)
	require.ErrorContains(t, err, `workspace "banned"`)
	require.ErrorContains(t, err, "workspace suspended")
	for _, d := range e.drv.Stats().Databases {
		if d.Database == e.dbs[2] {
			require.Equal(t, "acme", d.Workspace)
		}
	}
	e.requireQuiescent()
}

// TestRoutedPool: the pgx-native entry routes by context too.
func TestRoutedPool(t *testing.T) {
	e := newEnv(t, 2, Config{MaxConnections: 2})
	p, err := e.drv.OpenPool(e.routedDSN())
	require.NoError(t, err)
	defer p.Close()
	bg := context.Background()
	_, err = p.Acquire(bg)
	require.ErrorIs(t, err, ErrNoWorkspace)
	for i := range e.dbs {
		c, err := p.Acquire(WithWorkspace(bg, ws(i)))
		require.NoError(t, err)
		var name string
		require.NoError(t, c.Conn().QueryRow(bg, "SELECT current_database()").Scan(&name))
		c.Release()
		require.Equal(t, e.dbs[i], name)
	}
	e.requireQuiescent()
}

// TestRoutedDSNErrors needs no server: what a {workspace} DSN may not hold,
// and ids that cannot name a database.
func TestRoutedDSNErrors(t *testing.T) {
	drv, err := NewDriver(Config{MaxConnections: 4})
	require.NoError(t, err)
	defer drv.Close()
	for dsn, want := range map[string]string{
		"postgres://app:" + testPassword + "@db/ws_{workspace}?workspace=x":                      "workspace parameter cannot be used",
		"postgres://app:" + testPassword + "@db/ws_{workspace}?pool_reserved_conns=1":            "pool_reserved_conns cannot be used",
		"postgres://app:" + testPassword + "@{workspace}.db/app":                                 "only in the database name",
		"host=db user=app password=" + testPassword + " dbname=app application_name={workspace}": "only in the database name",
	} {
		_, err := drv.OpenConnector(dsn)
		require.ErrorContains(t, err, want, dsn)
		require.NotContains(t, err.Error(), testPassword)
	}
	for _, dsn := range []string{
		"postgres://app:pw@db/ws_{workspace}?sslmode=disable",
		"postgres://app:pw@db/ws_%7Bworkspace%7D?sslmode=disable",
		"host=db user=app password=pw dbname=ws_{workspace} sslmode=disable",
	} {
		c, err := drv.OpenConnector(dsn)
		require.NoError(t, err, dsn)
		r, ok := c.(*router)
		require.True(t, ok, dsn)
		p, err := r.params(context.Background(), "abc")
		require.NoError(t, err)
		require.Equal(t, "ws_abc", p.cfg.Database)
		require.Equal(t, "abc", p.workspace)
		require.Equal(t, "ws_{workspace}", r.tmpl.cfg.Database, "the template is not changed")
		_, err = r.params(context.Background(), strings.Repeat("x", 61))
		require.ErrorContains(t, err, "PostgreSQL truncates names beyond 63")
		_, err = r.params(context.Background(), "")
		require.ErrorContains(t, err, "must not be empty")
		require.NoError(t, c.(*router).Close())
	}
	_, err = drv.Open("postgres://app:pw@db/ws_{workspace}")
	require.ErrorContains(t, err, "open it with sql.Open or OpenDB")
}

// BenchmarkRoutedWorkspaceMemory reports what one *sql.DB for every
// workspace keeps per workspace it has served (its connector and database
// state), beside BenchmarkIdleWorkspaceHandleMemory's *sql.DB each. Run
// with -benchtime 1x.
func BenchmarkRoutedWorkspaceMemory(b *testing.B) {
	const n = 10_000
	for range b.N {
		drv, err := NewDriver(Config{MaxConnections: 80})
		if err != nil {
			b.Fatal(err)
		}
		c, err := drv.OpenConnector("postgres://app:pw@db.internal:5432/app_ws_{workspace}?sslmode=disable")
		if err != nil {
			b.Fatal(err)
		}
		r := c.(*router)
		ids := make([]string, n)
		for i := range ids {
			ids[i] = fmt.Sprintf("%06d", i)
		}
		before := heapInUse()
		g := runtime.NumGoroutine()
		for _, id := range ids {
			if _, err := r.connector(context.Background(), id); err != nil {
				b.Fatal(err)
			}
		}
		b.ReportMetric(float64(heapInUse()-before)/n, "heapB/workspace")
		b.ReportMetric(float64(runtime.NumGoroutine()-g)/n, "goroutines/workspace")
		_ = r.Close()
		drv.Close()
	}
}

// BenchmarkRoutedLookup is what routing adds to a checkout: the context lookup
// and the route's map load, without the checkout itself.
func BenchmarkRoutedLookup(b *testing.B) {
	drv, err := NewDriver(Config{MaxConnections: 80})
	if err != nil {
		b.Fatal(err)
	}
	defer drv.Close()
	c, _ := drv.OpenConnector("postgres://app:pw@db.internal:5432/app_ws_{workspace}?sslmode=disable")
	r := c.(*router)
	defer r.Close()
	ctx := WithWorkspace(context.Background(), "abc")
	b.ReportAllocs()
	for b.Loop() {
		ws, _ := WorkspaceFromContext(ctx)
		if _, err := r.connector(ctx, ws); err != nil {
			b.Fatal(err)
		}
	}
}

// TestRouterForgetsQuietWorkspaces needs no server: a router that has
// served many workspaces keeps only about twice minSweep of them, and the
// budget forgets their state.
func TestRouterForgetsQuietWorkspaces(t *testing.T) {
	drv, err := NewDriver(Config{MaxConnections: 4})
	require.NoError(t, err)
	defer drv.Close()
	c, err := drv.OpenConnector("postgres://app:pw@db.internal/ws_{workspace}?sslmode=disable")
	require.NoError(t, err)
	r := c.(*router)
	defer r.Close()
	const served = 10 * minSweep
	for i := 0; i < served; i++ {
		_, err := r.connector(context.Background(), fmt.Sprint(i))
		require.NoError(t, err)
	}
	r.mu.Lock()
	count := r.count
	r.mu.Unlock()
	n := 0
	r.routes.Range(func(any, any) bool { n++; return true })
	require.Equal(t, count, n)
	require.Less(t, n, 2*minSweep)
	drv.b.mu.Lock()
	states := len(drv.b.poolsLocked())
	drv.b.mu.Unlock()
	require.Equal(t, n, states, "the budget keeps a state per route and no more")
}

// TestRoutedCheckoutAfterTheRouteWasSwept: a handle that looked up a
// workspace just before a sweep forgot it looks it up again and succeeds.
func TestRoutedCheckoutAfterTheRouteWasSwept(t *testing.T) {
	e := newEnv(t, 1, Config{MaxConnections: 2})
	c, err := e.drv.OpenConnector(e.routedDSN())
	require.NoError(t, err)
	r := c.(*router)
	defer r.Close()
	ctx := WithWorkspace(context.Background(), ws(0))
	stale, err := r.connector(ctx, ws(0))
	require.NoError(t, err)
	r.mu.Lock()
	r.sweepLocked()
	r.mu.Unlock()
	_, err = stale.checkout(ctx)
	require.ErrorIs(t, err, errDBClosed, "a forgotten database serves no checkout")

	db := sql.OpenDB(r)
	require.Equal(t, e.dbs[0], currentDB(t, ctx, db))
	require.NoError(t, db.Close())
	require.Eventually(t, func() bool { return e.drv.Stats().Open == 0 }, e2eWait, pollEvery)
	require.Empty(t, e.drv.Stats().Databases)
}

// TestRoutedPingIsAHealthCheck: a ping that names no workspace, as
// gorm.Open's and a readiness probe's, answers whether the server is
// reachable, without a login or a backend; it failed with ErrNoWorkspace.
// A server nothing listens on is a *ServerDownError naming it, and one the
// circuit already knows is down is reported from the circuit.
func TestRoutedPingIsAHealthCheck(t *testing.T) {
	e := newEnv(t, 1, Config{MaxConnections: 2, AcquireTimeout: 500 * time.Millisecond})
	bg := context.Background()
	db := e.openRouted()
	require.NoError(t, db.PingContext(bg))
	require.Zero(t, e.drv.Stats().Open, "a health check takes no backend")
	require.Empty(t, e.drv.Stats().Databases)
	require.Zero(t, e.backends())
	require.Equal(t, e.dbs[0], currentDB(t, WithWorkspace(bg, ws(0)), db), "workspaces still route")
	c, err := db.Conn(WithWorkspace(bg, ws(0)))
	require.NoError(t, err)
	require.NoError(t, c.PingContext(bg), "a *sql.Conn on a workspace pings its backend")
	require.NoError(t, c.Close())

	port, err := pgtest.FreePort()
	require.NoError(t, err)
	down, err := e.drv.OpenDB(fmt.Sprintf("postgres://%s:%s@127.0.0.1:%d/ws_%s?sslmode=disable", e.role, testPassword, port, WorkspacePlaceholder))
	require.NoError(t, err)
	defer down.Close()
	err = down.PingContext(bg)
	require.ErrorIs(t, err, ErrServerDown)
	var sde *ServerDownError
	require.ErrorAs(t, err, &sde)
	require.Equal(t, fmt.Sprintf("127.0.0.1:%d", port), sde.Server)
	require.Zero(t, sde.Down, "found by its own dial: the circuit knew nothing")
	require.NotContains(t, err.Error(), testPassword)

	// A workspace's call finds the server down and opens its circuit; the
	// health check reports what the circuit knows.
	var one int
	err = down.QueryRowContext(WithWorkspace(bg, "w1"), "SELECT 1").Scan(&one)
	require.ErrorIs(t, err, ErrServerDown)
	err = down.PingContext(bg)
	require.ErrorAs(t, err, &sde)
	require.Positive(t, sde.Down, "reported from the circuit, down since the workspace's dial")
	require.NotContains(t, err.Error(), testPassword)
	e.requireQuiescent()
}
