package tenantpg

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// setDialTime stands in for a history of dials that took d each.
func (b *budget) setDialTime(d time.Duration) {
	b.mu.Lock()
	b.dialTime = ewma(d)
	b.mu.Unlock()
}

// TestBusyDatabaseWaitsInsteadOfDialing: with the budget full, a caller of a
// database whose only backend is busy waits for that backend, which is
// handed to it at check-in, instead of evicting another database's backend
// and dialing: a dial (made expensive here) costs more than the short wait.
func TestBusyDatabaseWaitsInsteadOfDialing(t *testing.T) {
	e := newEnv(t, 2, Config{MaxConnections: 2, MaxConnectionsPerDB: 2, AcquireTimeout: 30 * time.Second})
	ctx := context.Background()
	hot, other := e.open(0), e.open(1)
	for range 20 { // a use time of well under a second
		queryOne(t, hot)
	}
	queryOne(t, other) // the budget is full: one backend each
	e.drv.b.setDialTime(time.Minute)
	before := e.drv.Stats()

	holder, err := hot.Conn(ctx)
	require.NoError(t, err)
	require.NoError(t, holder.PingContext(ctx)) // hot's only backend is busy
	done := make(chan error, 1)
	go func() {
		var one int
		done <- hot.QueryRowContext(ctx, "SELECT 1").Scan(&one)
	}()
	waitForWaiters(t, e.drv, 1)
	require.NoError(t, holder.Close()) // checked in: handed to the waiter
	require.NoError(t, <-done)

	s := e.drv.Stats()
	require.Equal(t, before.Dials, s.Dials, "the waiter must not dial")
	require.Equal(t, before.Evictions["lru"], s.Evictions["lru"], "nothing may be evicted for it")
	require.Equal(t, before.Handoffs+1, s.Handoffs, "the backend passed straight to the waiter")
	require.Equal(t, 1, dbStats(s, "ws1").Open, "the other database keeps its backend")
	e.requireQuiescent()
}

// TestLoadGrowsTheDatabaseToItsCap: callers queued on one backend for long
// queries cost more than a dial, so the database dials up to its cap; one
// caller at a time never needs a second backend.
func TestLoadGrowsTheDatabaseToItsCap(t *testing.T) {
	e := newEnv(t, 2, Config{MaxConnections: 8, MaxConnectionsPerDB: 3, AcquireTimeout: 30 * time.Second})
	ctx := context.Background()
	serial, busy := e.open(0), e.open(1)
	for range 50 {
		queryOne(t, serial)
	}
	require.Equal(t, 1, dbStats(e.drv.Stats(), "ws0").Open, "one caller at a time needs one backend")
	require.Equal(t, uint64(1), e.drv.Stats().Dials)

	var wg sync.WaitGroup
	var errs errCollector
	for range 12 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range 10 {
				_, err := busy.ExecContext(ctx, "SELECT pg_sleep(0.01)")
				errs.add(err)
			}
		}()
	}
	wg.Wait()
	require.Empty(t, errs.list())
	s := e.drv.Stats()
	require.Equal(t, 3, dbStats(s, "ws1").Open, "twelve callers of 10 ms queries need the cap: %+v", s.Databases)
	require.LessOrEqual(t, s.Dials, uint64(1+3), "no dial beyond the cap")
	require.Greater(t, s.Handoffs, uint64(0))
	e.requireQuiescent()
}
