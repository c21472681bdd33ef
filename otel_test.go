package tenantpg

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"go.opentelemetry.io/otel/attribute"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	"go.opentelemetry.io/otel/sdk/metric/metricdata"
)

// collected is one collection from a ManualReader, indexed for assertions.
type collected struct{ rm metricdata.ResourceMetrics }

func collect(t testing.TB, r *sdkmetric.ManualReader) collected {
	t.Helper()
	var rm metricdata.ResourceMetrics
	require.NoError(t, r.Collect(context.Background(), &rm))
	return collected{rm}
}

func (c collected) metric(name string) (metricdata.Metrics, bool) {
	for _, sm := range c.rm.ScopeMetrics {
		for _, m := range sm.Metrics {
			if m.Name == name {
				return m, true
			}
		}
	}
	return metricdata.Metrics{}, false
}

// value returns the int64 data point of name whose attributes include all of
// kvs, and whether there is one.
func (c collected) value(name string, kvs ...attribute.KeyValue) (int64, bool) {
	m, ok := c.metric(name)
	if !ok {
		return 0, false
	}
	var points []metricdata.DataPoint[int64]
	switch d := m.Data.(type) {
	case metricdata.Sum[int64]:
		points = d.DataPoints
	case metricdata.Gauge[int64]:
		points = d.DataPoints
	}
	for _, p := range points {
		match := true
		for _, kv := range kvs {
			if v, ok := p.Attributes.Value(kv.Key); !ok || v != kv.Value {
				match = false
				break
			}
		}
		if match {
			return p.Value, true
		}
	}
	return 0, false
}

// pools returns the distinct db.client.connection.pool.name values of name.
func (c collected) pools(name string) map[string]bool {
	out := map[string]bool{}
	m, ok := c.metric(name)
	if !ok {
		return out
	}
	add := func(s attribute.Set) {
		if v, ok := s.Value("db.client.connection.pool.name"); ok {
			out[v.AsString()] = true
		}
	}
	switch d := m.Data.(type) {
	case metricdata.Sum[int64]:
		for _, p := range d.DataPoints {
			add(p.Attributes)
		}
	case metricdata.Histogram[float64]:
		for _, p := range d.DataPoints {
			add(p.Attributes)
		}
	}
	return out
}

func (c collected) histogramCount(name string) uint64 {
	m, ok := c.metric(name)
	if !ok {
		return 0
	}
	var n uint64
	for _, p := range m.Data.(metricdata.Histogram[float64]).DataPoints {
		n += p.Count
	}
	return n
}

func pool(ws string) attribute.KeyValue {
	return attribute.String("db.client.connection.pool.name", ws)
}

func state(s string) attribute.KeyValue { return attribute.String("db.client.connection.state", s) }

func newMeteredEnv(t *testing.T, n int, cfg Config) (*env, *sdkmetric.ManualReader) {
	reader := sdkmetric.NewManualReader()
	cfg.MeterProvider = sdkmetric.NewMeterProvider(sdkmetric.WithReader(reader))
	return newEnv(t, n, cfg), reader
}

func TestMetricsAgreeWithStatsAndServer(t *testing.T) {
	e, reader := newMeteredEnv(t, 3, Config{MaxConnections: 4, MaxConnectionsPerDB: 2, AcquireTimeout: 200 * time.Millisecond})
	ctx := context.Background()
	a, b, c := e.open(0), e.open(1), e.open(2)
	pinned, err := a.Conn(ctx)
	require.NoError(t, err)
	require.NoError(t, pinned.PingContext(ctx))
	queryOne(t, b)
	queryOne(t, c)

	got := collect(t, reader)
	s := e.drv.Stats()
	require.Equal(t, 3, s.Open)
	require.Equal(t, s.Open, e.backends(), "the server agrees with the driver")
	for _, ws := range []string{"ws0", "ws1", "ws2"} {
		d := dbStats(s, ws)
		idle, ok := got.value("db.client.connection.count", pool(ws), state("idle"))
		require.True(t, ok, ws)
		used, _ := got.value("db.client.connection.count", pool(ws), state("used"))
		require.Equal(t, int64(d.Idle), idle, ws)
		require.Equal(t, int64(d.Open-d.Idle), used, ws)
		max, _ := got.value("db.client.connection.max", pool(ws))
		require.Equal(t, int64(2), max)
		idleMax, _ := got.value("db.client.connection.idle.max", pool(ws))
		require.Equal(t, int64(2), idleMax)
	}
	ns, _ := got.value("db.client.connection.count", pool("ws0"), state("used"),
		attribute.String("db.namespace", e.dbs[0]), attribute.String("db.system.name", "postgresql"))
	require.Equal(t, int64(1), ns, "db.namespace and db.system.name are set")
	require.NotContains(t, fmt.Sprintf("%+v", got.rm), testPassword, "no metric attribute may carry the password")
	limit, _ := got.value("tenantpg.budget.limit", pool("tenantpg"))
	require.Equal(t, int64(4), limit)
	usedTokens, _ := got.value("tenantpg.budget.connections", attribute.String("tenantpg.connection.state", "used"))
	idleTokens, _ := got.value("tenantpg.budget.connections", attribute.String("tenantpg.connection.state", "idle"))
	require.Equal(t, int64(1), usedTokens)
	require.Equal(t, int64(2), idleTokens)
	require.GreaterOrEqual(t, got.histogramCount("db.client.connection.create_time"), uint64(3))
	require.GreaterOrEqual(t, got.histogramCount("db.client.connection.wait_time"), uint64(3))
	require.GreaterOrEqual(t, got.histogramCount("db.client.connection.use_time"), uint64(2))

	// A waiter shows as a pending request of its workspace and of the budget.
	require.NoError(t, e.drv.Configure(Config{MaxConnections: 3, MaxConnectionsPerDB: 2, AcquireTimeout: 300 * time.Millisecond, MeterProvider: e.drv.meterProvider}))
	pinnedB, err := b.Conn(ctx)
	require.NoError(t, err)
	require.NoError(t, pinnedB.PingContext(ctx))
	pinnedC, err := c.Conn(ctx)
	require.NoError(t, err)
	require.NoError(t, pinnedC.PingContext(ctx))
	errc := make(chan error, 1)
	third := e.open(1)
	go func() {
		c2, err := third.Conn(ctx)
		if err == nil {
			err = c2.PingContext(ctx)
			c2.Close()
		}
		errc <- err
	}()
	waitForWaiters(t, e.drv, 1)
	got = collect(t, reader)
	pending, ok := got.value("db.client.connection.pending_requests", pool("ws1"))
	require.True(t, ok)
	require.Equal(t, int64(1), pending)
	waiters, _ := got.value("tenantpg.budget.waiters", pool("tenantpg"))
	require.Equal(t, int64(1), waiters)

	// Its timeout is counted.
	require.ErrorIs(t, <-errc, ErrBudgetExhausted)
	got = collect(t, reader)
	timeouts, _ := got.value("db.client.connection.timeouts", pool("tenantpg"))
	require.Equal(t, int64(1), timeouts)
	exhausted, _ := got.value("tenantpg.budget.exhausted", pool("tenantpg"))
	require.Equal(t, int64(1), exhausted)

	require.NoError(t, pinned.Close())
	require.NoError(t, pinnedB.Close())
	require.NoError(t, pinnedC.Close())
	e.requireQuiescent()
}

func TestMetricsAttributeEvictionReasons(t *testing.T) {
	e, reader := newMeteredEnv(t, 3, Config{MaxConnections: 1, MaxConnectionsPerDB: 1, ConnMaxIdleTime: 300 * time.Millisecond})
	a, b := e.open(0), e.open(1)
	queryOne(t, a)
	queryOne(t, b)                                                                                            // evicts a's idle connection: lru
	require.Eventually(t, func() bool { return e.drv.Stats().Open == 0 }, 10*time.Second, 5*time.Millisecond) // idle_timeout
	got := collect(t, reader)
	lru, _ := got.value("tenantpg.budget.evictions", attribute.String("tenantpg.eviction.reason", "lru"))
	idle, _ := got.value("tenantpg.budget.evictions", attribute.String("tenantpg.eviction.reason", "idle_timeout"))
	shrink, _ := got.value("tenantpg.budget.evictions", attribute.String("tenantpg.eviction.reason", "budget_shrink"))
	require.Equal(t, int64(1), lru)
	require.Equal(t, int64(1), idle)
	require.Zero(t, shrink)
	require.Empty(t, got.pools("db.client.connection.count"), "a workspace with no connection stops reporting")
}

// TestMetricsCardinalityIsBounded opens 5,000 databases in turn, each taking
// a token and then going quiet, collecting after every one: per-workspace
// series never exceed the budget, the synchronous instruments carry only the
// driver's pool name, and nothing remains once every database is quiet.
// The databases are registered from real DSNs but never dialed: the
// accounting the metrics read is the driver's own.
func TestMetricsCardinalityIsBounded(t *testing.T) {
	const budget, databases = 8, 5000
	reader := sdkmetric.NewManualReader()
	drv, err := NewDriver(Config{MaxConnections: budget, MeterProvider: sdkmetric.NewMeterProvider(sdkmetric.WithReader(reader))})
	require.NoError(t, err)
	defer drv.Close()
	b := drv.b
	var open []*connector
	maxSeries := 0
	for i := 0; i < databases; i++ {
		c, err := drv.OpenConnector(fmt.Sprintf("postgres://app:pw@127.0.0.1:1/ws_%d?workspace=w%d", i, i))
		require.NoError(t, err)
		cn := c.(*connector)
		b.mu.Lock()
		b.takeLocked(cn.db)
		b.mu.Unlock()
		open = append(open, cn)
		if len(open) > budget { // the oldest goes quiet: its token returns, its *sql.DB closes
			old := open[0]
			open = open[1:]
			b.mu.Lock()
			b.giveLocked(old.db, backendDialing)
			b.mu.Unlock()
			require.NoError(t, old.Close())
		}
		if i%50 == 0 || i == databases-1 {
			got := collect(t, reader)
			n := len(got.pools("db.client.connection.count"))
			require.LessOrEqual(t, n, budget)
			if n > maxSeries {
				maxSeries = n
			}
		}
	}
	require.Equal(t, budget, maxSeries)
	for _, c := range open {
		b.mu.Lock()
		b.giveLocked(c.db, backendDialing)
		b.mu.Unlock()
		require.NoError(t, c.Close())
	}
	got := collect(t, reader)
	require.Empty(t, got.pools("db.client.connection.count"))
	require.Empty(t, got.pools("db.client.connection.max"))
	b.mu.Lock()
	require.Empty(t, b.poolsLocked(), "no per-database state is kept for quiet, closed databases")
	b.mu.Unlock()

	// Driver.Close unregisters the callback: the budget stops reporting.
	require.NoError(t, drv.Close())
	got = collect(t, reader)
	_, ok := got.value("tenantpg.budget.limit")
	require.False(t, ok)
}

func TestLogsAndStatsHandlerKeepSecrets(t *testing.T) {
	var logs bytes.Buffer
	logger := slog.New(slog.NewJSONHandler(&logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	// A generous acquire timeout: the eviction's close and dial below must
	// not time out on a loaded machine; the exhaustion has its own deadline.
	e := newEnv(t, 2, Config{MaxConnections: 1, MaxConnectionsPerDB: 1, AcquireTimeout: 10 * time.Second, Logger: logger})
	ctx := context.Background()
	a, b := e.open(0), e.open(1)
	queryOne(t, a)
	queryOne(t, b) // an eviction
	pinned, err := b.Conn(ctx)
	require.NoError(t, err)
	require.NoError(t, pinned.PingContext(ctx))
	short, cancel := context.WithTimeout(ctx, 100*time.Millisecond)
	require.ErrorIs(t, a.PingContext(short), ErrBudgetExhausted) // exhaustion
	cancel()
	require.NoError(t, pinned.Close())
	missing, err := e.drv.OpenDB(strings.Replace(e.dsn(0), e.dbs[0], e.dbs[0]+"_missing", 1))
	require.NoError(t, err)
	defer missing.Close()
	require.Error(t, missing.PingContext(ctx)) // a dial failure

	text := logs.String()
	require.NotContains(t, text, testPassword)
	require.NotContains(t, text, "postgres://")
	levels := map[string][]string{}
	for _, line := range strings.Split(strings.TrimSpace(text), "\n") {
		var rec map[string]any
		require.NoError(t, json.Unmarshal([]byte(line), &rec))
		levels[rec["level"].(string)] = append(levels[rec["level"].(string)], rec["msg"].(string))
	}
	require.Contains(t, levels["DEBUG"], "tenantpg: closing backends")
	require.Contains(t, levels["WARN"], "tenantpg: connection budget exhausted")
	require.Contains(t, levels["WARN"], "tenantpg: dial failed")

	srv := httptest.NewServer(StatsHandler(e.drv))
	defer srv.Close()
	resp, err := http.Get(srv.URL)
	require.NoError(t, err)
	var body bytes.Buffer
	_, _ = body.ReadFrom(resp.Body)
	resp.Body.Close()
	require.Equal(t, http.StatusOK, resp.StatusCode)
	require.Equal(t, "application/json", resp.Header.Get("Content-Type"))
	var s Stats
	require.NoError(t, json.Unmarshal(body.Bytes(), &s))
	require.Equal(t, 1, s.Limit)
	require.NotContains(t, body.String(), testPassword)
	resp, err = http.Post(srv.URL, "application/json", nil)
	require.NoError(t, err)
	resp.Body.Close()
	require.Equal(t, http.StatusMethodNotAllowed, resp.StatusCode)
	require.Equal(t, "GET, HEAD", resp.Header.Get("Allow"))
}

// BenchmarkCheckoutCheckinMetered is BenchmarkCheckoutCheckin with an SDK
// MeterProvider installed: the cost of recording use time on the hot path.
func BenchmarkCheckoutCheckinMetered(b *testing.B) {
	reader := sdkmetric.NewManualReader()
	e := newEnv(b, 1, Config{MaxConnections: 4, MeterProvider: sdkmetric.NewMeterProvider(sdkmetric.WithReader(reader))})
	benchmarkCheckoutCheckin(b, e)
}
