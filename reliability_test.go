package tenantpg

import (
	"context"
	"database/sql"
	"errors"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// TestHungDialReturnsToken dials a listener that accepts and never
// answers: the caller's dial ends at the acquire timeout, the token comes
// back once the socket is given up on, and another workspace keeps working
// meanwhile.
func TestHungDialReturnsToken(t *testing.T) {
	e := newEnv(t, 1, Config{MaxConnections: 2, MaxConnectionsPerDB: 1, AcquireTimeout: 300 * time.Millisecond})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	var held []net.Conn
	var mu sync.Mutex
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			held = append(held, c) // accepted, never answered
			mu.Unlock()
		}
	}()
	defer func() {
		ln.Close()
		<-done
		mu.Lock()
		for _, c := range held {
			c.Close()
		}
		mu.Unlock()
	}()

	hung, err := e.drv.OpenDB("postgres://app:" + testPassword + "@" + ln.Addr().String() + "/hung?sslmode=disable&workspace=hung")
	require.NoError(t, err)
	defer hung.Close()
	good := e.open(0)

	start := time.Now()
	err = hung.PingContext(context.Background())
	require.Error(t, err)
	require.Less(t, time.Since(start), 2*time.Second, "the dial must end at the acquire timeout")
	var ce *ConnectError
	require.True(t, errors.As(err, &ce), "%v", err)
	require.Equal(t, "hung", ce.Workspace)
	require.NotContains(t, err.Error(), testPassword)

	queryOne(t, good) // the other workspace is unaffected
	require.Eventually(t, func() bool { return dbStats(e.drv.Stats(), "hung").Open == 0 }, drainTimeout+2*time.Second, pollEvery,
		"the hung dial's token must come back")
	// The dial ran past the hung-dial time: the host counts as not
	// answering, and the caller is told the server is down.
	require.Equal(t, uint64(1), e.drv.Stats().DialErrors["unavailable"])
	require.ErrorIs(t, err, ErrServerDown)
	e.requireQuiescent()
}

// TestKilledBackendsReturnTokens terminates the role's backends repeatedly
// while callers run queries: afterwards every workspace answers and the
// driver's accounting equals the server's view.
func TestKilledBackendsReturnTokens(t *testing.T) {
	e := newEnv(t, 20, Config{MaxConnections: 6, AcquireTimeout: 10 * time.Second})
	sqlDBs := make([]*sql.DB, 20)
	for i := range sqlDBs {
		sqlDBs[i] = e.open(i)
	}
	ctx, stop := context.WithTimeout(context.Background(), 3*time.Second)
	defer stop()
	var wg sync.WaitGroup
	var okOps, failed int64
	var mu sync.Mutex
	for g := 0; g < 8; g++ {
		wg.Add(1)
		go func(g int) {
			defer wg.Done()
			for n := 0; ctx.Err() == nil; n++ {
				var v string
				err := sqlDBs[(g*7+n)%20].QueryRowContext(context.Background(), "SELECT v FROM kv WHERE id = 1").Scan(&v)
				mu.Lock()
				if err != nil {
					failed++
				} else {
					okOps++
				}
				mu.Unlock()
			}
		}(g)
	}
	kills := 0
	for ctx.Err() == nil {
		n, err := e.srv.TerminateBackends(context.Background(), e.role)
		require.NoError(t, err)
		kills += n
		time.Sleep(50 * time.Millisecond)
	}
	wg.Wait()
	t.Logf("%d queries succeeded, %d failed on killed backends, %d backends killed", okOps, failed, kills)
	require.Greater(t, kills, 0)
	require.Greater(t, okOps, int64(0))
	// Every workspace answers afterwards: broken connections were discarded.
	for _, db := range sqlDBs {
		for attempt := 0; ; attempt++ {
			var v string
			err := db.QueryRowContext(context.Background(), "SELECT v FROM kv WHERE id = 1").Scan(&v)
			if err == nil {
				break
			}
			// A connection killed while idle fails its next statement once.
			require.Less(t, attempt, 3, "workspace does not recover: %v", err)
		}
	}
	e.requireQuiescent()
}

// TestIdleKilledBackendsAreReplaced terminates every backend while its
// connection sits idle: the next statement of each workspace must succeed,
// because the checkout notices the server closed the connection before a
// statement is sent, and database/sql retries on a new one.
func TestIdleKilledBackendsAreReplaced(t *testing.T) {
	// Room for the replacements, so that no dead connection is evicted for
	// lack of a token before its own checkout finds it dead.
	e := newEnv(t, 4, Config{MaxConnections: 8})
	e.drv.b.livenessAfter = 0
	dbs := []*sql.DB{e.open(0), e.open(1), e.open(2), e.open(3)}
	for _, db := range dbs {
		queryOne(t, db)
		queryOne(t, db) // a second use: the connection is now idle after a reset-worthy check-in
	}
	n, err := e.srv.TerminateBackends(context.Background(), e.role)
	require.NoError(t, err)
	require.Equal(t, 4, n)
	require.Eventually(t, func() bool { return e.backends() == 0 }, e2eWait, pollEvery)
	for _, db := range dbs {
		var v string
		require.NoError(t, db.QueryRowContext(context.Background(), "SELECT v FROM kv WHERE id = 3").Scan(&v),
			"a backend killed while idle must not fail the next statement")
	}
	require.Equal(t, uint64(4), e.drv.Stats().Evictions["broken"])
	e.requireQuiescent()
}

// TestServerRestartMidLoad restarts the server (fast shutdown, same port)
// while callers run queries: during the outage they wait for the server's
// circuit, bounded by their context; afterwards every workspace answers
// without restarting anything, and the accounting equals the server's view.
// TestRestartUnderLoadRidesThrough counts the errors.
func TestServerRestartMidLoad(t *testing.T) {
	e := newEnv(t, 10, Config{MaxConnections: 6, AcquireTimeout: 2 * time.Second})
	dbs := make([]*sql.DB, 10)
	for i := range dbs {
		dbs[i] = e.open(i)
	}
	ctx, stop := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	var mu sync.Mutex
	var slowest time.Duration
	for g := 0; g < 6; g++ {
		wg.Add(1)
		go func(g int) {
			defer wg.Done()
			for n := 0; ctx.Err() == nil; n++ {
				qctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
				start := time.Now()
				var v string
				_ = dbs[(g+n)%10].QueryRowContext(qctx, "SELECT v FROM kv WHERE id = 2").Scan(&v)
				took := time.Since(start)
				cancel()
				mu.Lock()
				if took > slowest {
					slowest = took
				}
				mu.Unlock()
			}
		}(g)
	}
	require.Eventually(t, func() bool { return e.drv.Stats().Dials >= 6 }, e2eWait, pollEvery)
	require.NoError(t, e.srv.Restart())
	// Traffic across the restart for a moment, then stop it.
	time.Sleep(500 * time.Millisecond)
	stop()
	wg.Wait()
	require.Less(t, slowest, 4*time.Second, "a caller hung past its context during the outage")

	for i, db := range dbs {
		var err error
		for attempt := 0; attempt < 4; attempt++ {
			var v string
			if err = db.QueryRowContext(context.Background(), "SELECT v FROM kv WHERE id = 2").Scan(&v); err == nil {
				break
			}
		}
		require.NoError(t, err, "workspace %d does not recover after the restart", i)
	}
	e.requireQuiescent()
}

// TestContextStorm sends two thousand callers with short deadlines, or
// cancelled at random, at a full budget: afterwards no token, waiter or
// goroutine is left behind, and every workspace still answers.
func TestContextStorm(t *testing.T) {
	e := newEnv(t, 8, Config{MaxConnections: 3, MaxConnectionsPerDB: 1, AcquireTimeout: time.Second})
	dbs := make([]*sql.DB, 8)
	for i := range dbs {
		dbs[i] = e.open(i)
	}
	// Hold two of the three tokens for the whole storm.
	ctx := context.Background()
	var pins []*sql.Conn
	for i := 0; i < 2; i++ {
		c, err := dbs[i].Conn(ctx)
		require.NoError(t, err)
		require.NoError(t, c.PingContext(ctx))
		pins = append(pins, c)
	}
	var wg sync.WaitGroup
	var mu sync.Mutex
	outcomes := map[string]int{}
	for n := 0; n < 2000; n++ {
		wg.Add(1)
		go func(n int) {
			defer wg.Done()
			qctx, cancel := context.WithTimeout(ctx, time.Duration(1+n%20)*time.Millisecond)
			if n%3 == 0 {
				go cancel() // cancelled at some moment, not by the deadline
			}
			defer cancel()
			var one int
			err := dbs[2+n%6].QueryRowContext(qctx, "SELECT 1").Scan(&one)
			kind := "ok"
			switch {
			case err == nil:
			case errors.Is(err, context.Canceled):
				kind = "canceled"
			case errors.Is(err, context.DeadlineExceeded):
				kind = "deadline"
			default:
				kind = err.Error()
			}
			mu.Lock()
			outcomes[kind]++
			mu.Unlock()
		}(n)
	}
	wg.Wait()
	t.Logf("outcomes: %v", outcomes)
	for kind := range outcomes {
		require.Contains(t, []string{"ok", "canceled", "deadline"}, kind)
	}
	// database/sql's opener goroutines may still wait for connections that
	// callers who gave up had asked for: their context never ends, so the
	// acquire timeout bounds them.
	if !assertEventually(func() bool { return e.drv.Stats().Waiting == 0 }, 2*time.Second+time.Second) {
		t.Fatalf("no waiter may outlive the acquire timeout:\n%s", e.drv.dumpState())
	}
	for _, c := range pins {
		require.NoError(t, c.Close())
	}
	for _, db := range dbs {
		queryOne(t, db)
	}
	e.requireQuiescent()
}

// TestServerLimitBelowBudget gives the role a CONNECTION LIMIT of 2 under
// a budget of 4. While two idle connections of one workspace fill the
// server's slots, another workspace's dial is refused (53300): the driver
// closes an idle connection and retries, and the caller sees no error.
func TestServerLimitBelowBudget(t *testing.T) {
	e := newEnv(t, 2, Config{MaxConnections: 4, MaxConnectionsPerDB: 2, AcquireTimeout: 5 * time.Second})
	ctx := context.Background()
	e.setRoleLimit(2)
	a, b := e.open(0), e.open(1)
	c1, err := a.Conn(ctx)
	require.NoError(t, err)
	c2, err := a.Conn(ctx)
	require.NoError(t, err)
	require.NoError(t, c1.PingContext(ctx))
	require.NoError(t, c2.PingContext(ctx))
	require.NoError(t, c1.Close())
	require.NoError(t, c2.Close()) // two idle connections hold both server slots

	queryOne(t, b)
	s := e.drv.Stats()
	require.GreaterOrEqual(t, s.DialErrors["rejected"], uint64(1), "the server must have refused the first dial")
	require.GreaterOrEqual(t, s.Evictions["server_full"], uint64(1))
	e.requireQuiescent()
	require.LessOrEqual(t, e.backends(), 2)
}
