package tenantpg

import (
	"context"
	"database/sql"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
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
	dbs := e.openEach(drivers, workspaces)
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

// TestFleetSquatterUnderLoad runs three drivers on one fleet budget while a
// session of another role takes every slot they let go of and another
// session of that role spoofs "need" on the fleet's channel, as a hostile
// neighbour with CONNECT on the fleet database would. The load moves from
// driver to driver: no caller sees an error, no driver's limit is 0 while
// it reports the squatter, each reports it (stats, metric, one Warn line),
// and the members are the three drivers. Once the squatter leaves, the
// drivers lease beyond the floor again.
func TestFleetSquatterUnderLoad(t *testing.T) {
	const fleet, workspaces, replicas = 8, 3, 3
	logs := make([]*syncBuffer, replicas)
	newCfg := func(i int) Config {
		logs[i] = &syncBuffer{}
		return Config{MaxConnections: fleet, MaxConnectionsPerDB: 3, FleetMaxConnections: fleet, FleetName: t.Name(),
			AcquireTimeout: 10 * time.Second, Logger: slog.New(slog.NewTextHandler(logs[i], nil))}
	}
	cfg := newCfg(0)
	reader := sdkmetric.NewManualReader()
	cfg.MeterProvider = sdkmetric.NewMeterProvider(sdkmetric.WithReader(reader))
	e := newEnv(t, workspaces, cfg)
	e.setRoleLimit(fleet)
	drivers := []*Driver{e.drv}
	for i := 1; i < replicas; i++ {
		drv, err := NewDriver(newCfg(i))
		require.NoError(t, err)
		t.Cleanup(func() { drv.Close() })
		drivers = append(drivers, drv)
	}
	dbs := e.openEach(drivers, workspaces)
	fleetOf := func(drv *Driver) (ServerStats, FleetStats) {
		s := drv.Stats()
		require.Len(t, s.Servers, 1)
		require.NotNil(t, s.Servers[0].Fleet)
		return s.Servers[0], *s.Servers[0].Fleet
	}
	for _, drv := range drivers {
		require.Eventually(t, func() bool { _, f := fleetOf(drv); return f.Connected && f.Members == replicas },
			e2eWait, pollEvery, "the drivers' sessions hold their own slots")
	}

	// The neighbour: one session takes every free slot, at its own pace
	// (the adversary polls; nothing here waits on it), another spoofs
	// needs, which would make the drivers yield their slots to it.
	role := squatRole(t, e.srv)
	squat := squatConn(t, e.srv, role)
	spoof := squatConn(t, e.srv, role)
	k1 := fleetKey(t.Name(), e.role)
	neighbour, stopNeighbour := context.WithCancel(context.Background())
	var neighbours sync.WaitGroup
	var grabbed atomic.Int64
	neighbours.Add(2)
	go func() {
		defer neighbours.Done()
		for neighbour.Err() == nil {
			var n int64
			err := squat.QueryRow(neighbour, `SELECT count(*) FILTER (WHERE pg_try_advisory_lock($1::int4, s)) FROM generate_series(1, $2::int4) AS s
				WHERE s NOT IN (SELECT objid::int4 FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()
				AND classid = $3::int8::oid AND objsubid = 2)`, k1, fleet-1, int64(uint32(k1))).Scan(&n)
			if err == nil {
				grabbed.Add(n)
			}
			select {
			case <-neighbour.Done():
			case <-time.After(2 * time.Millisecond):
			}
		}
	}()
	go func() {
		defer neighbours.Done()
		for neighbour.Err() == nil {
			_, _ = spoof.Exec(neighbour, "SELECT pg_notify($1, $2)", fleetChannel(k1), "need 1 100")
			select {
			case <-neighbour.Done():
			case <-time.After(20 * time.Millisecond):
			}
		}
	}()
	t.Cleanup(func() { stopNeighbour(); neighbours.Wait() })

	// The floor, measured: whenever a driver's stats name a squatter, its
	// limit is at least 1 (the floor is set before the squatter is
	// published). Sampled, since no event marks the moments in between.
	var floorBroken, squattedSamples atomic.Int64
	sampling, stopSampling := context.WithCancel(context.Background())
	sampled := make(chan struct{})
	go func() {
		defer close(sampled)
		for sampling.Err() == nil {
			for _, drv := range drivers {
				for _, srv := range drv.Stats().Servers {
					if srv.Fleet != nil && len(srv.Fleet.Squatters) > 0 {
						squattedSamples.Add(1)
						if srv.Limit < 1 {
							floorBroken.Add(1)
						}
					}
				}
			}
			select {
			case <-sampling.Done():
			case <-time.After(5 * time.Millisecond):
			}
		}
	}()
	t.Cleanup(func() { stopSampling(); <-sampled })

	// load runs workers on driver r's databases in turn, and fails the
	// test if any call failed.
	load := func(r, workers, rounds int) {
		var errs errCollector
		var wg sync.WaitGroup
		for w := range workers {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for i := range rounds {
					_, err := dbs[r][(w+i)%workspaces].ExecContext(context.Background(), "SELECT pg_sleep(0.002)")
					errs.add(err)
				}
			}()
		}
		wg.Wait()
		if failed := errs.list(); len(failed) > 0 {
			t.Fatalf("driver %d: %d of %d calls failed, the first: %v", r, len(failed), workers*rounds, failed[0])
		}
	}
	// The load moves from driver to driver: each one's need makes the
	// others yield, and the squatter takes what they release. At the floor
	// every switch of database is a dial (a login): short phases.
	start := time.Now()
	for _, r := range []int{0, 1, 2, 0} {
		load(r, 8, 8)
		st := drivers[r].Stats()
		t.Logf("load on driver %d done at %v: dials %d, evictions %v, refused dials %d",
			r, time.Since(start).Round(time.Millisecond), st.Dials, st.Evictions, st.DialErrors["rejected"])
	}
	require.Positive(t, grabbed.Load(), "the neighbour took slots")

	for r, drv := range drivers {
		require.Eventually(t, func() bool {
			_, f := fleetOf(drv)
			return slices.ContainsFunc(f.Squatters, func(q FleetSquatter) bool { return q.PID == squat.PgConn().PID() && q.Role == role })
		}, e2eWait, pollEvery, "driver %d reports the squatter", r)
		_, f := fleetOf(drv)
		require.Equal(t, replicas, f.Members, "driver %d: neither the squatter nor the spoofer is a member", r)
		require.Equal(t, 1, strings.Count(logs[r].String(), "another role holds slots"), "driver %d: one Warn line:\n%s", r, logs[r])
		require.Contains(t, logs[r].String(), fmt.Sprintf("pid=%d", squat.PgConn().PID()))
		require.NotContains(t, logs[r].String(), testPassword)
	}
	stopSampling()
	<-sampled
	require.Positive(t, squattedSamples.Load())
	require.Zero(t, floorBroken.Load(), "a driver was held at 0 while squatted")
	got := collect(t, reader)
	squatted, ok := got.value("tenantpg.fleet.squatted", semconv.ServerAddress(e.srv.Host))
	require.True(t, ok)
	require.Positive(t, squatted)

	// The neighbour leaves: the slots are the fleet's again.
	stopNeighbour()
	neighbours.Wait()
	require.NoError(t, squat.Close(context.Background()))
	for _, drv := range drivers {
		require.Eventually(t, func() bool { _, f := fleetOf(drv); return len(f.Squatters) == 0 }, e2eWait, pollEvery)
	}
	load(0, 8, 8)
	_, f := fleetOf(e.drv)
	require.GreaterOrEqual(t, f.Share, 2, "leases beyond the floor again")
}

// TestFleetLoginFallsBackToAnotherDSN: the first DSN registered for the
// fleet's server has a wrong password; the coordination session logs in
// with the next DSN of the role, and the fleet works. Neither password
// reaches the stats or the log.
func TestFleetLoginFallsBackToAnotherDSN(t *testing.T) {
	const fleet = 6
	logs := &syncBuffer{}
	cfg := Config{MaxConnections: fleet, FleetMaxConnections: fleet, FleetName: t.Name(), AcquireTimeout: 10 * time.Second,
		Logger: slog.New(slog.NewTextHandler(logs, nil))}
	e := newEnv(t, 2, cfg)
	e.setRoleLimit(fleet)
	const wrong = "not-the-Pa55w0rd-plugh"
	bad, err := e.drv.OpenDB(e.srv.URL(e.role, wrong, e.dbs[0]) + "&workspace=ws0")
	require.NoError(t, err)
	t.Cleanup(func() { bad.Close() })
	good := e.open(1)

	fleetStats := func() FleetStats {
		s := e.drv.Stats()
		require.Len(t, s.Servers, 1)
		require.NotNil(t, s.Servers[0].Fleet)
		return *s.Servers[0].Fleet
	}
	require.Eventually(t, func() bool { return fleetStats().Connected }, e2eWait, pollEvery, "the session logged in with the good DSN")
	queryOne(t, good)
	require.Eventually(t, func() bool { return fleetStats().Share >= 1 }, e2eWait, pollEvery, "the caller's backend is leased")
	f := fleetStats()
	require.Positive(t, f.Failures)
	require.Contains(t, f.LastError, "28P01", "the wrong password's refusal is recorded")
	for _, text := range []string{fmt.Sprintf("%+v", f), logs.String()} {
		require.NotContains(t, text, wrong)
		require.NotContains(t, text, testPassword)
		require.NotContains(t, text, "postgres://")
	}
}

// openEach opens the env's first n databases through each driver: dbs[r][i]
// is database i through drivers[r], one pool each.
func (e *env) openEach(drivers []*Driver, n int) [][]*sql.DB {
	e.t.Helper()
	dbs := make([][]*sql.DB, len(drivers))
	for r, drv := range drivers {
		for i := range n {
			db, err := drv.OpenDB(e.dsn(i))
			require.NoError(e.t, err)
			e.t.Cleanup(func() { db.Close() })
			dbs[r] = append(dbs[r], db)
		}
	}
	return dbs
}
