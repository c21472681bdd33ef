package tenantpg

import (
	"context"
	"database/sql"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// TestFleetDriversShareTheServer runs two drivers, as two replicas would,
// with one fleet budget equal to the role's CONNECTION LIMIT. The load
// moves from one to the other: the idle one gives its backends up for the
// busy one, the server never refuses a dial, and closing a driver hands
// its slots back.
func TestFleetDriversShareTheServer(t *testing.T) {
	const fleet, workspaces = 8, 6
	cfg := Config{MaxConnections: fleet, MaxConnectionsPerDB: 3, FleetMaxConnections: fleet, FleetName: t.Name(),
		AcquireTimeout: 20 * time.Second}
	e := newEnv(t, workspaces, cfg)
	e.setRoleLimit(fleet)
	other, err := NewDriver(cfg)
	require.NoError(t, err)
	t.Cleanup(func() { other.Close() })
	drivers := []*Driver{e.drv, other}
	dbs := make([][]*sql.DB, 2)
	for r, drv := range drivers {
		for i := range workspaces {
			db, err := drv.OpenDB(e.dsn(i))
			require.NoError(t, err)
			t.Cleanup(func() { db.Close() })
			dbs[r] = append(dbs[r], db)
		}
	}
	peak := e.samplePeak()
	var errs errCollector
	load := func(r, workers, rounds int) {
		var wg sync.WaitGroup
		for w := range workers {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for i := range rounds {
					db := dbs[r][(w+i)%workspaces]
					_, err := db.ExecContext(context.Background(), "SELECT pg_sleep(0.002)")
					errs.add(err)
				}
			}()
		}
		wg.Wait()
	}
	share := func(drv *Driver) FleetStats {
		s := drv.Stats()
		require.Len(t, s.Servers, 1)
		require.NotNil(t, s.Servers[0].Fleet)
		return *s.Servers[0].Fleet
	}

	load(0, 12, 20)
	require.Eventually(t, func() bool { return share(e.drv).Members == 2 }, e2eWait, pollEvery, "members")
	busy := e.drv.Stats().Open
	require.Greater(t, busy, 1, "the first driver grew while the second was idle")

	// The load moves: the second driver needs slots the first holds idle.
	load(1, 12, 20)
	require.Empty(t, errs.list())
	require.Greater(t, other.Stats().PeakOpen, fleet-2-busy, "the second driver got slots the first gave up")
	require.Positive(t, e.drv.Stats().Evictions["fleet"], "the first driver closed idle backends for the second")
	for _, drv := range drivers {
		s := drv.Stats()
		require.Zero(t, s.DialErrors["rejected"], "the server refused a dial: the fleet over-asked")
		f := s.Servers[0].Fleet
		require.True(t, f.Connected)
		require.LessOrEqual(t, s.Open, f.Share, "holds backends its leases do not cover")
	}
	max, _ := peak.Stop()
	require.LessOrEqual(t, max, fleet, "the server's count, coordination sessions included")

	// A draining stop: the first driver's slots go back at Close.
	require.NoError(t, e.drv.Close())
	require.Eventually(t, func() bool { return share(other).Members == 1 }, e2eWait, pollEvery)
	load(1, 12, 10)
	require.Empty(t, errs.list())
	require.Greater(t, other.Stats().Open, fleet-2-busy)
	require.LessOrEqual(t, share(other).Share, fleet-2, "one slot for its session and one kept as the door")
}
