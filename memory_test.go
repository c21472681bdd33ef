package tenantpg

import (
	"fmt"
	"runtime"
	"testing"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/require"
)

// heapInUse returns the live heap after a full collection.
func heapInUse() uint64 {
	runtime.GC()
	runtime.GC()
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return m.HeapAlloc
}

// BenchmarkDatabaseStateMemory reports what the driver keeps for a database
// that has a connector but no connection: its entry in the budget's map and
// its state. Run with -benchtime 1x; the figure is B/database.
func BenchmarkDatabaseStateMemory(b *testing.B) {
	const n = 100_000
	for range b.N {
		bg := newBudget(Config{MaxConnections: 80, MaxConnectionsPerDB: 3}, realClock{}, nopIO{})
		params := make([]*dsnParams, n)
		for i := range params {
			p := &dsnParams{cfg: &pgx.ConnConfig{}, server: serverKey{host: "db.internal", port: 5432},
				workspace: fmt.Sprintf("ws_%06d", i)}
			p.cfg.Database = fmt.Sprintf("app_ws_%06d", i)
			params[i] = p
		}
		before := heapInUse()
		for _, p := range params {
			if _, err := bg.register(p); err != nil {
				b.Fatal(err)
			}
		}
		after := heapInUse()
		b.ReportMetric(float64(after-before)/n, "B/database")
		runtime.KeepAlive(bg)
		runtime.KeepAlive(params)
	}
}

// BenchmarkIdleWorkspaceHandleMemory reports what an application holds for
// a workspace whose *sql.DB is open but has no connection: the driver's
// state, the connector (pgx's parsed configuration) and database/sql's DB
// with its connection-opener goroutine. Run with -benchtime 1x.
func BenchmarkIdleWorkspaceHandleMemory(b *testing.B) {
	const n = 10_000
	for range b.N {
		drv, err := NewDriver(Config{MaxConnections: 80})
		if err != nil {
			b.Fatal(err)
		}
		runtime.GC()
		var ms runtime.MemStats
		runtime.ReadMemStats(&ms)
		before, stackBefore, g := ms.HeapAlloc, ms.StackInuse, runtime.NumGoroutine()
		dbs := make([]any, 0, n)
		for i := 0; i < n; i++ {
			db, err := drv.OpenDB(fmt.Sprintf("postgres://app:pw@db.internal:5432/app_ws_%06d?sslmode=disable&workspace=ws_%06d", i, i))
			if err != nil {
				b.Fatal(err)
			}
			dbs = append(dbs, db)
		}
		runtime.GC()
		runtime.ReadMemStats(&ms)
		b.ReportMetric(float64(ms.HeapAlloc-before)/n, "heapB/workspace")
		b.ReportMetric(float64(ms.StackInuse-stackBefore)/n, "stackB/workspace")
		b.ReportMetric(float64(runtime.NumGoroutine()-g)/n, "goroutines/workspace")
		for _, db := range dbs {
			db.(interface{ Close() error }).Close()
		}
		drv.Close()
	}
}

// TestWorkspacesOpenedOnceDoNotGrowTheHeap opens and closes many distinct
// workspaces, as an application serving a long tail does over days: the
// driver must forget each, so the heap reaches a plateau.
func TestWorkspacesOpenedOnceDoNotGrowTheHeap(t *testing.T) {
	drv, err := NewDriver(Config{MaxConnections: 8})
	require.NoError(t, err)
	defer drv.Close()
	const rounds, perRound = 8, 2_500
	var heaps []uint64
	for r := 0; r < rounds; r++ {
		for i := 0; i < perRound; i++ {
			db, err := drv.OpenDB(fmt.Sprintf("postgres://app:pw@db.internal:5432/app_ws_%d_%d?sslmode=disable&workspace=ws_%d_%d", r, i, r, i))
			require.NoError(t, err)
			require.NoError(t, db.Close())
		}
		heaps = append(heaps, heapInUse())
	}
	drv.b.mu.Lock()
	states := len(drv.b.poolsLocked())
	drv.b.mu.Unlock()
	require.Zero(t, states, "every closed workspace is forgotten")
	// After the first round (lazily built pools, caches) the heap must not
	// climb with the number of workspaces ever opened: 17,500 more of
	// them may not add 1 MiB.
	t.Logf("heap after each %d workspaces: %v", perRound, heaps)
	require.Less(t, int64(heaps[rounds-1])-int64(heaps[0]), int64(1<<20))
}
