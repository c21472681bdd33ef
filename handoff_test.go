package tenantpg

import (
	"context"
	"os"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// TestHandoffIsNotEvicted reproduces the hand-off race: with SetMaxOpenConns,
// database/sql passes a returned connection to a caller waiting on the same
// *sql.DB after IsValid and before ResetSession. A driver that evicts it in
// that instant makes database/sql retry, and when every retry meets the same
// fate the caller gets "driver: bad connection". Workspace A runs eight
// callers through one connection; workspace B keeps needing A's token.
func TestHandoffIsNotEvicted(t *testing.T) {
	e := newEnv(t, 2, Config{MaxConnections: 1, MaxConnectionsPerDB: 1, AcquireTimeout: 30 * time.Second})
	if g := os.Getenv("TENANTPG_TEST_GRACE"); g != "" {
		// To see the race this test guards against: TENANTPG_TEST_GRACE=0s.
		e.drv.b.grace, _ = time.ParseDuration(g)
	}
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
	t.Logf("evictions %v, stale checkouts %d, B queries %d", s.Evictions, e.drv.b.staleCheckouts, bQueries.Load())
	if errs := errs.list(); len(errs) > 0 {
		t.Fatalf("%d callers saw errors, the first: %v", len(errs), errs[0])
	}
	require.GreaterOrEqual(t, bQueries.Load(), int64(2), "B must not starve while A is busy")
	require.Greater(t, s.Evictions["lru"]+s.Evictions["handoff"], uint64(0), "B must have taken A's token")
	e.requireQuiescent()
}
