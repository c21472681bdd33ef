package tenantpg

import (
	"context"
	"database/sql"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"go.opentelemetry.io/otel/attribute"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	semconv "go.opentelemetry.io/otel/semconv/v1.43.0"
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
	otherCfg := cfg
	reader := sdkmetric.NewManualReader()
	cfg.MeterProvider = sdkmetric.NewMeterProvider(sdkmetric.WithReader(reader))
	e := newEnv(t, workspaces, cfg)
	e.setRoleLimit(fleet)
	other, err := NewDriver(otherCfg)
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

	// The fleet and the server's budget as metrics, by server.
	got := collect(t, reader)
	srv := semconv.ServerAddress(e.srv.Host)
	metric := func(name string) int64 {
		v, ok := got.value(name, srv)
		require.True(t, ok, name)
		return v
	}
	require.EqualValues(t, 2, metric("tenantpg.fleet.members"))
	require.EqualValues(t, 1, metric("tenantpg.fleet.connected"))
	require.LessOrEqual(t, metric("tenantpg.fleet.share"), int64(fleet-2)) // may be 0: it gave its idle slots away
	require.GreaterOrEqual(t, metric("tenantpg.fleet.leased"), metric("tenantpg.fleet.share"))
	require.Positive(t, metric("tenantpg.fleet.released"), "it gave slots to the other driver")
	require.Positive(t, metric("tenantpg.fleet.round_trips"))
	limit, ok := got.value("tenantpg.server.limit", srv)
	require.True(t, ok)
	require.Equal(t, int64(e.drv.Stats().Servers[0].Limit), limit)
	_, ok = got.value("tenantpg.server.connections", srv, attribute.String("tenantpg.connection.state", "idle"))
	require.True(t, ok)

	// A draining stop: the first driver's slots go back at Close.
	require.NoError(t, e.drv.Close())
	require.Eventually(t, func() bool { return share(other).Members == 1 }, e2eWait, pollEvery)
	load(1, 12, 10)
	require.Empty(t, errs.list())
	require.Greater(t, other.Stats().Open, fleet-2-busy)
	require.LessOrEqual(t, share(other).Share, fleet-2, "one slot for its session and one kept as the door")
}

// TestFleetCoordinationLost terminates a driver's coordination session
// under load: its callers see no error, it falls back to a share it held,
// and it connects again and leases what it holds before it grows.
func TestFleetCoordinationLost(t *testing.T) {
	const fleet, workspaces = 8, 4
	cfg := Config{MaxConnections: fleet, MaxConnectionsPerDB: 2, FleetMaxConnections: fleet, FleetName: t.Name(),
		AcquireTimeout: 20 * time.Second}
	e := newEnv(t, workspaces, cfg)
	e.setRoleLimit(fleet)
	dbs := make([]*sql.DB, workspaces)
	for i := range dbs {
		dbs[i] = e.open(i)
	}
	fleetStats := func() FleetStats {
		s := e.drv.Stats()
		require.Len(t, s.Servers, 1)
		require.NotNil(t, s.Servers[0].Fleet)
		return *s.Servers[0].Fleet
	}
	var errs errCollector
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for w := range 6 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				_, err := dbs[(w+i)%workspaces].ExecContext(context.Background(), "SELECT pg_sleep(0.001)")
				errs.add(err)
			}
		}()
	}
	require.Eventually(t, func() bool { return fleetStats().Connected && fleetStats().Share > 1 }, e2eWait, pollEvery)
	var killed int
	require.NoError(t, e.srv.Admin().QueryRowContext(context.Background(),
		`SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE usename = $1 AND application_name LIKE 'tenantpg fleet%'`,
		e.role).Scan(&killed))
	require.Equal(t, 1, killed, "one coordination session per process and server")
	require.Eventually(t, func() bool { f := fleetStats(); return f.Failures > 0 && f.Connected }, e2eWait, pollEvery,
		"the coordination session came back")
	close(stop)
	wg.Wait()
	require.Empty(t, errs.list())
	// Back, it leases what it holds: until then its backends are the
	// fallback share, which no lock covers.
	require.Eventually(t, func() bool { s := e.drv.Stats(); return s.Open <= s.Servers[0].Fleet.Share }, e2eWait, pollEvery,
		"holds backends its leases do not cover")
	require.Zero(t, e.drv.Stats().DialErrors["rejected"])
}

// TestFleetLeasesUnusedReservations: a reservation nothing uses yet is held
// back from the other databases, so the fleet share must cover it, or a
// caller of another database could never dial (found in review).
func TestFleetLeasesUnusedReservations(t *testing.T) {
	const fleet = 10
	cfg := Config{MaxConnections: fleet, FleetMaxConnections: fleet, FleetName: t.Name(), AcquireTimeout: 5 * time.Second}
	e := newEnv(t, 2, cfg)
	e.setRoleLimit(fleet)
	reserved := e.open(0, "pool_reserved_conns=3")
	other := e.open(1)
	queryOne(t, other)
	s := e.drv.Stats()
	require.GreaterOrEqual(t, s.Servers[0].Fleet.Share, 3+1, "the unused reservation and the caller's backend")
	queryOne(t, reserved)
}
