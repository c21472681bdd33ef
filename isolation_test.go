package tenantpg

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"strings"
	"testing"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/stretchr/testify/require"

	"github.com/tenantpg/tenantpg/internal/pgtest"
)

// Isolation: a backend serves only the pool (connector) that dialed it, with
// every setting of that pool's DSN. Each case opens two pools of one
// database on a budget of 4 and uses them alternately, so that the second
// would find the first's idle backend if backends were shared by database.

// alternate runs query on a, then on b, then on a and b again, and returns
// what each returned the second time.
func alternate(t *testing.T, a, b *sql.DB, query string) (fromA, fromB string) {
	t.Helper()
	ctx := context.Background()
	for range 2 {
		require.NoError(t, a.QueryRowContext(ctx, query).Scan(&fromA))
		require.NoError(t, b.QueryRowContext(ctx, query).Scan(&fromB))
	}
	return fromA, fromB
}

func TestIsolationRunTimeParameters(t *testing.T) {
	e := newEnv(t, 1, Config{MaxConnections: 4})
	ctx := context.Background()
	require.NoError(t, e.srv.Exec(ctx, e.dbs[0],
		"CREATE SCHEMA tenant_a AUTHORIZATION "+pgtest.QuoteIdent(e.role),
		"CREATE SCHEMA tenant_b AUTHORIZATION "+pgtest.QuoteIdent(e.role),
		"CREATE TABLE tenant_a.who (name text)", "INSERT INTO tenant_a.who VALUES ('a')",
		"CREATE TABLE tenant_b.who (name text)", "INSERT INTO tenant_b.who VALUES ('b')",
		"GRANT ALL ON ALL TABLES IN SCHEMA tenant_a, tenant_b TO "+pgtest.QuoteIdent(e.role)))

	t.Run("search_path", func(t *testing.T) {
		a, b := e.open(0, "search_path=tenant_a"), e.open(0, "search_path=tenant_b")
		fromA, fromB := alternate(t, a, b, "SELECT name FROM who")
		require.Equal(t, "a", fromA)
		require.Equal(t, "b", fromB, "the second DSN's queries must run in its own search_path")
	})
	t.Run("options (row-level security setting)", func(t *testing.T) {
		a, b := e.open(0, "options=-c%20app.tenant%3D1001"), e.open(0, "options=-c%20app.tenant%3D2002")
		fromA, fromB := alternate(t, a, b, "SELECT current_setting('app.tenant')")
		require.Equal(t, "1001", fromA)
		require.Equal(t, "2002", fromB, "tenant 2002's queries must not run as tenant 1001")
	})
	t.Run("application_name", func(t *testing.T) {
		a, b := e.open(0, "application_name=svc_a"), e.open(0, "application_name=svc_b")
		fromA, fromB := alternate(t, a, b, "SELECT current_setting('application_name')")
		require.Equal(t, "svc_a", fromA)
		require.Equal(t, "svc_b", fromB)
	})
	e.requireQuiescent()
}

func TestIsolationCredentialsAndTLS(t *testing.T) {
	e := newEnv(t, 1, Config{MaxConnections: 4})
	ctx := context.Background()
	good := e.open(0)
	var one int
	require.NoError(t, good.QueryRowContext(ctx, "SELECT 1").Scan(&one))
	require.Equal(t, 1, e.drv.Stats().Idle, "the good DSN's backend waits idle")

	t.Run("wrong password", func(t *testing.T) {
		dsn := e.srv.URL(e.role, "not-the-password", e.dbs[0]) + "&workspace=ws0"
		bad, err := e.drv.OpenDB(dsn)
		require.NoError(t, err)
		defer bad.Close()
		err = bad.QueryRowContext(ctx, "SELECT 1").Scan(&one)
		var pgErr *pgconn.PgError
		require.True(t, errors.As(err, &pgErr), "a wrong password must fail the login, got %v", err)
		require.Equal(t, "28P01", pgErr.Code)
		require.NotContains(t, err.Error(), "not-the-password")
	})
	t.Run("sslmode=require on a server without TLS", func(t *testing.T) {
		dsn := e.srv.URL(e.role, testPassword, e.dbs[0])
		dsn = dsn[:len(dsn)-len("sslmode=disable")] + "sslmode=require&workspace=ws0"
		tls, err := e.drv.OpenDB(dsn)
		require.NoError(t, err)
		defer tls.Close()
		err = tls.QueryRowContext(ctx, "SELECT 1").Scan(&one)
		require.Error(t, err, "sslmode=require must never run over a plaintext backend")
	})
	// The good pool's backend was never lent: it is still the only one.
	require.NoError(t, good.QueryRowContext(ctx, "SELECT 1").Scan(&one))
	e.requireQuiescent()
}

// backendPIDs returns the server pids that n concurrent *sql.Conns of db
// run on.
func backendPIDs(t *testing.T, db *sql.DB, n int) map[int]bool {
	t.Helper()
	ctx := context.Background()
	pids := map[int]bool{}
	var conns []*sql.Conn
	for range n {
		c, err := db.Conn(ctx)
		require.NoError(t, err)
		var pid int
		require.NoError(t, c.QueryRowContext(ctx, "SELECT pg_backend_pid()").Scan(&pid))
		pids[pid] = true
		conns = append(conns, c)
	}
	for _, c := range conns {
		require.NoError(t, c.Close())
	}
	return pids
}

func TestIsolationSameDSNTwoPools(t *testing.T) {
	e := newEnv(t, 1, Config{MaxConnections: 4, MaxConnectionsPerDB: 2})
	a, b := e.open(0), e.open(0)
	for range 3 {
		pa, pb := backendPIDs(t, a, 2), backendPIDs(t, b, 2)
		for pid := range pa {
			require.False(t, pb[pid], "two *sql.DBs of one DSN served queries from backend %d", pid)
		}
	}
	s := e.drv.Stats()
	require.Equal(t, 4, s.Open, "each pool keeps its own 2 backends (the per-database cap applies per pool)")
	require.Len(t, s.Databases, 2)
	require.NotEqual(t, s.Databases[0].Pool, s.Databases[1].Pool)
	e.requireQuiescent()
}

func TestIsolationExecModeAndStatementCache(t *testing.T) {
	e := newEnv(t, 1, Config{MaxConnections: 4})
	ctx := context.Background()
	cached := e.open(0) // pgx's default: statements prepared and cached per backend
	simple := e.open(0, "default_query_exec_mode=simple_protocol")
	var n int
	for range 2 {
		require.NoError(t, cached.QueryRowContext(ctx, "SELECT $1::int", 7).Scan(&n))
		c, err := simple.Conn(ctx)
		require.NoError(t, err)
		require.NoError(t, c.QueryRowContext(ctx, "SELECT $1::int", 7).Scan(&n))
		require.NoError(t, c.QueryRowContext(ctx, "SELECT count(*) FROM pg_prepared_statements").Scan(&n))
		require.NoError(t, c.Close())
		require.Zero(t, n, "a simple_protocol pool prepared statements: it ran on another pool's backend")
	}
	require.NoError(t, cached.QueryRowContext(ctx, "SELECT count(*) FROM pg_prepared_statements").Scan(&n))
	require.NotZero(t, n, "the default pool caches its statements")
	e.requireQuiescent()
}

// TestIsolationClosedPoolSessionsEnd leaves session state behind in a pool
// (a temporary table, SET, an advisory lock, LISTEN), closes the pool while
// one of its connections is still in use, and checks that its idle backend
// closed at once, the busy one at check-in, and that nothing of either
// session reaches a new pool of the same DSN.
func TestIsolationClosedPoolSessionsEnd(t *testing.T) {
	e := newEnv(t, 1, Config{MaxConnections: 4})
	ctx := context.Background()
	first := e.open(0)
	idle, err := first.Conn(ctx)
	require.NoError(t, err)
	busy, err := first.Conn(ctx)
	require.NoError(t, err)
	var idlePID, busyPID int
	require.NoError(t, idle.QueryRowContext(ctx, "SELECT pg_backend_pid()").Scan(&idlePID))
	require.NoError(t, busy.QueryRowContext(ctx, "SELECT pg_backend_pid()").Scan(&busyPID))
	for _, q := range []string{"CREATE TEMP TABLE scratch (x int)", "SET statement_timeout = 4242",
		"SELECT pg_advisory_lock(777)", "LISTEN tenant_channel"} {
		_, err := idle.ExecContext(ctx, q)
		require.NoError(t, err, q)
	}
	require.NoError(t, idle.Close()) // its backend goes idle, session state and all
	require.Equal(t, 1, e.drv.Stats().Idle)

	require.NoError(t, first.Close())
	require.Eventually(t, func() bool { return e.drv.Stats().Idle == 0 }, e2eWait, pollEvery,
		"closing a pool closes its idle backends at once, with handles still open")
	require.Eventually(t, func() bool { return !pidAlive(t, e, idlePID) }, e2eWait, pollEvery)
	var one int
	require.NoError(t, busy.QueryRowContext(ctx, "SELECT 1").Scan(&one), "a connection in use keeps working")
	require.NoError(t, busy.Close())
	require.Eventually(t, func() bool { return !pidAlive(t, e, busyPID) }, e2eWait, pollEvery,
		"a closed pool's busy backend closes at check-in")

	second := e.open(0)
	var pid int
	var timeout string
	var locked bool
	require.NoError(t, second.QueryRowContext(ctx,
		"SELECT pg_backend_pid(), current_setting('statement_timeout'), pg_try_advisory_lock(777)").Scan(&pid, &timeout, &locked))
	require.NotEqual(t, idlePID, pid)
	require.NotEqual(t, "4242ms", timeout)
	require.True(t, locked, "the closed pool's advisory lock must be gone")
	var temp int
	require.NoError(t, second.QueryRowContext(ctx,
		"SELECT count(*) FROM pg_class WHERE relname = 'scratch' AND relpersistence = 't'").Scan(&temp))
	require.Zero(t, temp)
	e.requireQuiescent()
}

func pidAlive(t *testing.T, e *env, pid int) bool {
	t.Helper()
	var n int
	require.NoError(t, e.srv.Admin().QueryRowContext(context.Background(),
		"SELECT count(*) FROM pg_stat_activity WHERE pid = $1", pid).Scan(&n))
	return n > 0
}

// TestIsolationPerPoolCap: pool_max_conns bounds each pool, as pgxpool's
// MaxConns does, not every pool of the database together.
func TestIsolationPerPoolCap(t *testing.T) {
	e := newEnv(t, 1, Config{MaxConnections: 4})
	ctx := context.Background()
	a, b := e.open(0, "pool_max_conns=1"), e.open(0, "pool_max_conns=1")
	ca, err := a.Conn(ctx)
	require.NoError(t, err)
	cb, err := b.Conn(ctx)
	require.NoError(t, err)
	var pa, pb int
	require.NoError(t, ca.QueryRowContext(ctx, "SELECT pg_backend_pid()").Scan(&pa))
	require.NoError(t, cb.QueryRowContext(ctx, "SELECT pg_backend_pid()").Scan(&pb),
		"the second pool must not wait for the first's only backend")
	require.NotEqual(t, pa, pb)
	require.NoError(t, ca.Close())
	require.NoError(t, cb.Close())
	for _, d := range e.drv.Stats().Databases {
		require.Equal(t, 1, d.Cap, fmt.Sprintf("pool %d", d.Pool))
	}
	e.requireQuiescent()
}

// TestIsolationResetSession: with pool_reset_session=true, what a caller
// leaves in its session is gone for the next caller of the same backend,
// and pgx's statement cache follows (a cached statement is prepared again,
// not run by a name the reset deallocated).
func TestIsolationResetSession(t *testing.T) {
	e := newEnv(t, 1, Config{MaxConnections: 4})
	ctx := context.Background()
	db := e.open(0, "pool_reset_session=true", "pool_max_conns=1")
	var firstPID, n int
	c, err := db.Conn(ctx)
	require.NoError(t, err)
	require.NoError(t, c.QueryRowContext(ctx, "SELECT pg_backend_pid()").Scan(&firstPID))
	require.NoError(t, c.QueryRowContext(ctx, "SELECT $1::int", 5).Scan(&n)) // cached by pgx
	for _, q := range []string{"CREATE TEMP TABLE scratch (x int)", "SET statement_timeout = 4242", "SELECT pg_advisory_lock(778)"} {
		_, err := c.ExecContext(ctx, q)
		require.NoError(t, err, q)
	}
	require.NoError(t, c.Close())

	var pid, temp int
	var timeout string
	var locked bool
	require.NoError(t, db.QueryRowContext(ctx, "SELECT pg_backend_pid(), current_setting('statement_timeout'), pg_try_advisory_lock(778), "+
		"(SELECT count(*) FROM pg_class WHERE relname = 'scratch' AND relpersistence = 't')").Scan(&pid, &timeout, &locked, &temp))
	require.Equal(t, firstPID, pid, "the pool's only backend is reused")
	require.Equal(t, "0", timeout)
	require.True(t, locked)
	require.Zero(t, temp)
	require.NoError(t, db.QueryRowContext(ctx, "SELECT $1::int", 6).Scan(&n), "pgx's statement cache must not name a deallocated statement")
	require.Equal(t, 6, n)

	t.Run("off by default", func(t *testing.T) {
		plain := e.open(0, "pool_max_conns=1")
		_, err := plain.ExecContext(ctx, "SET statement_timeout = 4242")
		require.NoError(t, err)
		require.NoError(t, plain.QueryRowContext(ctx, "SELECT current_setting('statement_timeout')").Scan(&timeout))
		require.Equal(t, "4242ms", timeout, "without the option a session keeps its state, as with pgx's stdlib")
	})
	e.requireQuiescent()
}

// TestIsolationTLSPerPool runs a server with TLS and two pools of one
// database on it, one with sslmode=verify-full and one with
// sslmode=disable, alternately: each backend carries its own pool's TLS
// setting, as the server reports it (pg_stat_ssl).
func TestIsolationTLSPerPool(t *testing.T) {
	pgtest.Require(t)
	srv, err := pgtest.Start(pgtest.Options{MaxConnections: 10, TLS: true})
	require.NoError(t, err)
	t.Cleanup(func() { srv.Stop() })
	if srv.CertFile == "" {
		t.Skip("the server named by the environment was not started with TLS")
	}
	ctx := context.Background()
	role, err := srv.CreateRole(ctx, "tls_app", testPassword, 4)
	require.NoError(t, err)
	dbs, err := srv.CreateDatabases(ctx, role, "", "tls_ws")
	require.NoError(t, err)
	drv, err := NewDriver(Config{MaxConnections: 4})
	require.NoError(t, err)
	t.Cleanup(func() { drv.Close() })
	verified := srv.URL(role, testPassword, dbs[0])
	require.Contains(t, verified, "sslmode=verify-full")
	plain := strings.Replace(verified, "sslmode=verify-full", "sslmode=disable", 1)
	a, err := drv.OpenDB(verified)
	require.NoError(t, err)
	defer a.Close()
	b, err := drv.OpenDB(plain)
	require.NoError(t, err)
	defer b.Close()
	const q = "SELECT ssl::text FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
	fromA, fromB := alternate(t, a, b, q)
	require.Equal(t, "true", fromA)
	require.Equal(t, "false", fromB)
	fromA, fromB = alternate(t, b, a, q)
	require.Equal(t, "false", fromA)
	require.Equal(t, "true", fromB, "a verify-full pool never runs on a plaintext backend")
}
