package tenantpg

import (
	"context"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// TestHandoffAndFairness runs eight callers of workspace A through one
// backend, which passes from caller to caller at check-in, while workspace B
// keeps needing A's token: A's callers see no error, and B is not starved
// (after waiting defaultHandoffAfter it takes the next backend A checks in).
func TestHandoffAndFairness(t *testing.T) {
	e := newEnv(t, 2, Config{MaxConnections: 1, MaxConnectionsPerDB: 1, AcquireTimeout: 30 * time.Second})
	a := e.open(0)
	b := e.open(1)
	b.SetMaxIdleConns(0) // B gives its connection back after every query

	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	const rounds = 300
	var errs errCollector
	var wg sync.WaitGroup
	for g := 0; g < 8; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < rounds; i++ {
				var one int
				errs.add(a.QueryRowContext(ctx, "SELECT 1").Scan(&one))
			}
		}()
	}
	var bQueries atomic.Int64
	aDone := make(chan struct{})
	bDone := make(chan struct{})
	go func() {
		defer close(bDone)
		for {
			select {
			case <-aDone:
				return
			default:
			}
			var one int
			err := b.QueryRowContext(ctx, "SELECT 1").Scan(&one)
			errs.add(err)
			if err == nil {
				bQueries.Add(1)
			}
		}
	}()
	wg.Wait()
	close(aDone)
	<-bDone
	s := e.drv.Stats()
	t.Logf("evictions %v, hand-offs %d, B queries %d", s.Evictions, s.Handoffs, bQueries.Load())
	if errs := errs.list(); len(errs) > 0 {
		t.Fatalf("%d callers saw errors, the first: %v", len(errs), errs[0])
	}
	require.GreaterOrEqual(t, bQueries.Load(), int64(2), "B must not starve while A is busy")
	require.Greater(t, s.Evictions["lru"]+s.Evictions["handoff"], uint64(0), "B must have taken A's token")
	require.Greater(t, s.Handoffs, uint64(0), "A's callers must have passed the backend between them")
	e.requireQuiescent()
}
