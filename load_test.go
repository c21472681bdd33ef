package tenantpg

import (
	"context"
	"database/sql"
	"fmt"
	"math/rand"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/require"
)

// TestManyWorkspacesUnderLoad hammers 320 workspace databases from 32
// goroutines through a budget of 20, while the server refuses the role's 21st
// connection (CONNECTION LIMIT 20). Every kind of use database/sql offers is
// mixed in: plain queries, transactions, prepared statements, pinned
// connections with Raw access to pgx.
func TestManyWorkspacesUnderLoad(t *testing.T) {
	const (
		workspaces = 320
		budget     = 20
		workers    = 32
	)
	opsPerPhase := 3000
	if testing.Short() {
		opsPerPhase = 600
	}
	e := newEnv(t, workspaces, Config{MaxConnections: budget, MaxConnectionsPerDB: 3})
	dbs := make([]*sql.DB, workspaces)
	for i := range dbs {
		dbs[i] = e.open(i)
	}

	phases := []struct {
		name string
		pick func(r *rand.Rand, z *rand.Zipf, n int) int
	}{
		{"zipf", func(r *rand.Rand, z *rand.Zipf, n int) int { return int(z.Uint64()) }},
		{"round-robin", func(r *rand.Rand, z *rand.Zipf, n int) int { return n % workspaces }},
	}
	sampler := e.samplePeak()
	start := time.Now()
	var errs errCollector
	var ops atomic.Int64
	for _, ph := range phases {
		var next atomic.Int64
		var wg sync.WaitGroup
		for w := 0; w < workers; w++ {
			wg.Add(1)
			go func(seed int64) {
				defer wg.Done()
				r := rand.New(rand.NewSource(seed))
				z := rand.NewZipf(r, 1.1, 1, workspaces-1)
				for {
					n := int(next.Add(1))
					if n > opsPerPhase {
						return
					}
					i := ph.pick(r, z, n)
					errs.add(mixedOp(dbs[i], n, r))
					ops.Add(1)
				}
			}(int64(w))
		}
		wg.Wait()
		s := e.drv.Stats()
		t.Logf("after %s: dials %d, evictions %v, waits %d (%s)", ph.name, s.Dials, s.Evictions, s.WaitCount, s.WaitDuration.Round(time.Millisecond))
	}
	elapsed := time.Since(start)
	peak, samples := sampler.Stop()
	s := e.drv.Stats()
	t.Logf("%d ops in %s (%.0f ops/s); dials %d, evictions %v, waits %d (%s), server peak %d/%d over %d samples",
		ops.Load(), elapsed.Round(time.Millisecond), float64(ops.Load())/elapsed.Seconds(),
		s.Dials, s.Evictions, s.WaitCount, s.WaitDuration.Round(time.Millisecond), peak, budget, samples)

	for i, err := range errs.list() {
		if i < 10 {
			t.Errorf("caller saw an error: %v", err)
		}
	}
	require.Empty(t, errs.list(), "callers must see no error")
	require.LessOrEqual(t, peak, budget, "the server saw more connections than the budget")
	require.LessOrEqual(t, s.PeakOpen, budget)
	require.Zero(t, s.DialErrors["rejected"], "the server rejected connections")
	require.Greater(t, s.Evictions["lru"]+s.Evictions["handoff"], uint64(0), "a budget this far below demand must evict")
	e.requireQuiescent()
}

// mixedOp runs one of the ways an application uses a *sql.DB.
func mixedOp(db *sql.DB, n int, r *rand.Rand) error {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	id := 1 + r.Intn(10)
	switch n % 5 {
	case 0, 1:
		var v string
		if err := db.QueryRowContext(ctx, "SELECT v FROM kv WHERE id = $1", id).Scan(&v); err != nil {
			return fmt.Errorf("query: %w", err)
		}
		if v != fmt.Sprintf("v%d", id) {
			return fmt.Errorf("query: got %q for id %d", v, id)
		}
	case 2:
		tx, err := db.BeginTx(ctx, nil)
		if err != nil {
			return fmt.Errorf("begin: %w", err)
		}
		defer tx.Rollback()
		if _, err := tx.ExecContext(ctx, "UPDATE kv SET v = v WHERE id = $1", id); err != nil {
			return fmt.Errorf("tx update: %w", err)
		}
		var c int
		if err := tx.QueryRowContext(ctx, "SELECT count(*) FROM kv").Scan(&c); err != nil {
			return fmt.Errorf("tx count: %w", err)
		}
		if err := tx.Commit(); err != nil {
			return fmt.Errorf("commit: %w", err)
		}
	case 3:
		st, err := db.PrepareContext(ctx, "SELECT v FROM kv WHERE id = $1")
		if err != nil {
			return fmt.Errorf("prepare: %w", err)
		}
		defer st.Close()
		var v string
		if err := st.QueryRowContext(ctx, id).Scan(&v); err != nil {
			return fmt.Errorf("stmt query: %w", err)
		}
	case 4:
		c, err := db.Conn(ctx)
		if err != nil {
			return fmt.Errorf("conn: %w", err)
		}
		defer c.Close()
		return c.Raw(func(dc any) error {
			pc, err := PgxConn(dc)
			if err != nil {
				return err
			}
			var got int
			if err := pc.QueryRow(ctx, "SELECT id FROM kv WHERE id = $1", pgx.QueryExecModeSimpleProtocol, id).Scan(&got); err != nil {
				return fmt.Errorf("raw query: %w", err)
			}
			if got != id {
				return fmt.Errorf("raw query: got %d want %d", got, id)
			}
			return nil
		})
	}
	return nil
}
