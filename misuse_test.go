package tenantpg

import (
	"context"
	"database/sql"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// Misuse: what applications get wrong, and what the budget must survive.

// TestHeldConnDoesNotStarveOthers pins a *sql.Conn and never returns it
// while other workspaces share what is left of the budget; Stats names the
// workspace holding it and for how long.
func TestHeldConnDoesNotStarveOthers(t *testing.T) {
	e := newEnv(t, 4, Config{MaxConnections: 2, MaxConnectionsPerDB: 1, AcquireTimeout: 10 * time.Second})
	ctx := context.Background()
	held, err := e.open(0).Conn(ctx)
	require.NoError(t, err)
	defer held.Close()
	require.NoError(t, held.PingContext(ctx))
	pinnedAt := time.Now()

	others := []*sql.DB{e.open(1), e.open(2), e.open(3)}
	var wg sync.WaitGroup
	var errs errCollector
	for g := 0; g < 6; g++ {
		wg.Add(1)
		go func(g int) {
			defer wg.Done()
			for n := 0; n < 15; n++ {
				var v string
				errs.add(others[(g+n)%3].QueryRowContext(ctx, "SELECT v FROM kv WHERE id = 3").Scan(&v))
			}
		}(g)
	}
	wg.Wait()
	require.Empty(t, errs.list(), "one token left must serve every other workspace in turn")

	atLeast := time.Since(pinnedAt)
	s := e.drv.Stats()
	ws0 := dbStats(s, "ws0")
	require.Equal(t, 1, ws0.InUse, "the held connection is shown as in use")
	require.GreaterOrEqual(t, ws0.LongestUse, atLeast, "and as held since it was pinned")
	require.Equal(t, ws0.LongestUse, s.LongestUse)
	for _, ws := range []string{"ws1", "ws2", "ws3"} {
		require.Zero(t, dbStats(s, ws).LongestUse, ws)
	}
	require.Greater(t, s.Evictions["lru"]+s.Evictions["handoff"], uint64(0), "the others took turns")
	require.NoError(t, held.Close())
	e.requireQuiescent()
	require.Zero(t, e.drv.Stats().LongestUse)
}

// TestDBCloseWhileQueriesRun closes a *sql.DB under running queries: queries
// in flight finish, later ones fail with database/sql's own error, and every
// token comes back.
func TestDBCloseWhileQueriesRun(t *testing.T) {
	e := newEnv(t, 2, Config{MaxConnections: 4, MaxConnectionsPerDB: 3})
	ctx := context.Background()
	db := e.open(0)
	bystander := e.open(1)
	started := make(chan struct{}, 8)
	var wg sync.WaitGroup
	var unexpected errCollector
	for g := 0; g < 6; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				started <- struct{}{}
				_, err := db.ExecContext(ctx, "SELECT pg_sleep(0.05)")
				if err != nil {
					if err.Error() != "sql: database is closed" {
						unexpected.add(err)
					}
					return
				}
			}
		}()
	}
	for i := 0; i < 6; i++ {
		<-started
	}
	require.Eventually(t, func() bool { return dbStats(e.drv.Stats(), "ws0").InUse == 3 }, e2eWait, pollEvery)
	require.NoError(t, db.Close())
	go func() {
		for range started { // let every worker reach its failing call
		}
	}()
	wg.Wait()
	close(started)
	require.Empty(t, unexpected.list())
	require.NoError(t, db.Close(), "a second Close is harmless")
	queryOne(t, bystander)

	require.Eventually(t, func() bool { return dbStats(e.drv.Stats(), "ws0").Open == 0 }, e2eWait, pollEvery)
	e.requireQuiescent()
	e.drv.b.mu.Lock()
	for _, d := range e.drv.b.poolsLocked() {
		require.NotEqual(t, "ws0", d.workspace, "a closed *sql.DB with no connection leaves no state")
	}
	e.drv.b.mu.Unlock()
}

// TestDriverCloseWithCheckedOutConns closes the driver while a transaction,
// an open result set and a pinned connection are in use: they keep working
// until returned, then close; nothing new is served.
func TestDriverCloseWithCheckedOutConns(t *testing.T) {
	e := newEnv(t, 3, Config{MaxConnections: 3, MaxConnectionsPerDB: 1})
	ctx := context.Background()
	txDB, rowsDB, pinDB := e.open(0), e.open(1), e.open(2)
	tx, err := txDB.BeginTx(ctx, nil)
	require.NoError(t, err)
	_, err = tx.ExecContext(ctx, "UPDATE kv SET v = 'closing' WHERE id = 1")
	require.NoError(t, err)
	rows, err := rowsDB.QueryContext(ctx, "SELECT id FROM kv ORDER BY id")
	require.NoError(t, err)
	require.True(t, rows.Next())
	pinned, err := pinDB.Conn(ctx)
	require.NoError(t, err)
	require.NoError(t, pinned.PingContext(ctx))

	closed := make(chan error, 1)
	go func() { closed <- e.drv.Close() }()
	select {
	case err := <-closed:
		require.NoError(t, err)
	case <-time.After(e2eWait):
		t.Fatal("Driver.Close blocked on checked-out connections")
	}

	require.NoError(t, tx.Commit())
	n := 1
	for rows.Next() {
		n++
	}
	require.NoError(t, rows.Err())
	require.Equal(t, 10, n)
	require.NoError(t, pinned.PingContext(ctx))
	require.NoError(t, pinned.Close())
	require.ErrorIs(t, pinned.Close(), sql.ErrConnDone)

	var one int
	err = txDB.QueryRowContext(ctx, "SELECT 1").Scan(&one)
	require.ErrorIs(t, err, errDriverClosed)
	require.Eventually(t, func() bool { return e.drv.Stats().Open == 0 && e.backends() == 0 }, e2eWait, pollEvery)
	e.requireQuiescent()

	// The committed change is on the server.
	var v string
	check, err := sql.Open("pgx", e.dsn(0))
	require.NoError(t, err)
	defer check.Close()
	require.NoError(t, check.QueryRowContext(ctx, "SELECT v FROM kv WHERE id = 1").Scan(&v))
	require.Equal(t, "closing", v)
}

// TestDoubleCloses closes every kind of handle twice: no token is given back
// twice and no counter goes negative.
func TestDoubleCloses(t *testing.T) {
	e := newEnv(t, 2, Config{MaxConnections: 2, MaxConnectionsPerDB: 2})
	ctx := context.Background()

	dc, err := e.drv.Open(e.dsn(0))
	require.NoError(t, err)
	require.NoError(t, dc.Close())
	require.NoError(t, dc.Close())

	db := e.open(1)
	st, err := db.PrepareContext(ctx, "SELECT v FROM kv WHERE id = $1")
	require.NoError(t, err)
	var v string
	require.NoError(t, st.QueryRowContext(ctx, 4).Scan(&v))
	require.NoError(t, st.Close())
	require.NoError(t, st.Close())
	c, err := db.Conn(ctx)
	require.NoError(t, err)
	require.NoError(t, c.PingContext(ctx))
	require.NoError(t, c.Close())
	require.ErrorIs(t, c.Close(), sql.ErrConnDone)
	require.NoError(t, db.Close())
	require.NoError(t, db.Close())

	require.Eventually(t, func() bool { return e.drv.Stats().Open == 0 && e.backends() == 0 }, e2eWait, pollEvery)
	e.requireQuiescent()
	e.drv.b.mu.Lock()
	require.Empty(t, e.drv.b.poolsLocked())
	e.drv.b.mu.Unlock()
	require.NoError(t, e.drv.Close())
	require.NoError(t, e.drv.Close())
}
