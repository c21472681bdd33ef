package tenantpg

import (
	"cmp"
	"context"
	"errors"
	"slices"
	"time"

	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/metric"
	semconv "go.opentelemetry.io/otel/semconv/v1.43.0"
	"go.opentelemetry.io/otel/semconv/v1.43.0/dbconv"
)

// Version is the library's version, reported as the instrumentation scope
// version of its metrics.
const Version = "0.1.0"

const instrumentationName = "github.com/tenantpg/tenantpg"

// Attribute keys of the budget's own instruments.
const (
	attrConnState      = attribute.Key("tenantpg.connection.state")
	attrEvictionReason = attribute.Key("tenantpg.eviction.reason")
)

// metrics holds a driver's instruments.
//
// Cardinality is bounded by design. Per-workspace series come only from
// observable instruments, reported by one callback for the whole driver, for
// the databases that hold connections at that moment: at most the budget's
// worth, and a workspace that drops to zero stops reporting. The
// synchronous instruments (histograms, timeouts) carry the driver's pool
// name instead of the workspace's, because an SDK keeps every attribute set
// a synchronous instrument has seen, and per-workspace sets would grow with
// every workspace ever used.
type metrics struct {
	createTime dbconv.ClientConnectionCreateTime
	waitTime   dbconv.ClientConnectionWaitTime
	useTime    dbconv.ClientConnectionUseTime
	timeouts   dbconv.ClientConnectionTimeouts

	count   dbconv.ClientConnectionCountObservable
	max     dbconv.ClientConnectionMaxObservable
	idleMax dbconv.ClientConnectionIdleMaxObservable
	pending dbconv.ClientConnectionPendingRequestsObservable

	budgetLimit       metric.Int64ObservableUpDownCounter
	budgetConnections metric.Int64ObservableUpDownCounter
	budgetWaiters     metric.Int64ObservableUpDownCounter
	budgetEvictions   metric.Int64ObservableCounter
	budgetDialErrors  metric.Int64ObservableCounter
	budgetExhausted   metric.Int64ObservableCounter
	budgetLeaks       metric.Int64ObservableCounter

	serverDown     metric.Int64ObservableGauge
	serverDownTime metric.Float64ObservableGauge
	serverWaiters  metric.Int64ObservableUpDownCounter
	// The server's budget.
	serverLimit, serverConnections, serverDialSlots metric.Int64ObservableUpDownCounter
	// The fleet budget's coordination, per server.
	fleetShare, fleetMembers, fleetSquatted                    metric.Int64ObservableUpDownCounter
	fleetConnected                                             metric.Int64ObservableGauge
	fleetLeased, fleetReleased, fleetRoundTrips, fleetFailures metric.Int64ObservableCounter

	driverSet  attribute.Set // pool name = the driver's name
	driverOpt  metric.MeasurementOption
	recordOpts []metric.RecordOption // driverOpt, allocated once so that recording allocates nothing
	addOpts    []metric.AddOption
	reg        metric.Registration
	stateAttrs [4]metric.MeasurementOption // budget connections by state
	reasonOpts [numReasons]metric.MeasurementOption
	dialOpts   [numDialErrorKinds]metric.MeasurementOption
}

// newMetrics creates the instruments on mp (the global MeterProvider when
// nil) and registers the one callback that observes b.
func newMetrics(mp metric.MeterProvider, name string, b *budget) (*metrics, error) {
	if mp == nil {
		mp = otel.GetMeterProvider()
	}
	meter := mp.Meter(instrumentationName, metric.WithInstrumentationVersion(Version),
		metric.WithSchemaURL(semconv.SchemaURL))
	m := &metrics{driverSet: attribute.NewSet(
		semconv.DBClientConnectionPoolName(name), semconv.DBSystemNamePostgreSQL)}
	m.driverOpt = metric.WithAttributeSet(m.driverSet)
	m.recordOpts = []metric.RecordOption{m.driverOpt}
	m.addOpts = []metric.AddOption{m.driverOpt}
	var err, e error
	keep := func(e error) { err = errors.Join(err, e) }
	// Durations in seconds, with buckets for connection pools: from
	// sub-millisecond checkouts to waits of many seconds.
	buckets := metric.WithExplicitBucketBoundaries(0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
	m.createTime, e = dbconv.NewClientConnectionCreateTime(meter, buckets)
	keep(e)
	m.waitTime, e = dbconv.NewClientConnectionWaitTime(meter, buckets)
	keep(e)
	m.useTime, e = dbconv.NewClientConnectionUseTime(meter, buckets)
	keep(e)
	m.timeouts, e = dbconv.NewClientConnectionTimeouts(meter)
	keep(e)
	m.count, e = dbconv.NewClientConnectionCountObservable(meter)
	keep(e)
	m.max, e = dbconv.NewClientConnectionMaxObservable(meter)
	keep(e)
	m.idleMax, e = dbconv.NewClientConnectionIdleMaxObservable(meter)
	keep(e)
	m.pending, e = dbconv.NewClientConnectionPendingRequestsObservable(meter)
	keep(e)
	m.budgetLimit, e = meter.Int64ObservableUpDownCounter("tenantpg.budget.limit", metric.WithUnit("{connection}"),
		metric.WithDescription("The budget: the most connections the driver holds to the server across all databases."))
	keep(e)
	m.budgetConnections, e = meter.Int64ObservableUpDownCounter("tenantpg.budget.connections", metric.WithUnit("{connection}"),
		metric.WithDescription("Tokens held, by tenantpg.connection.state: used, idle, dialing, closing."))
	keep(e)
	m.budgetWaiters, e = meter.Int64ObservableUpDownCounter("tenantpg.budget.waiters", metric.WithUnit("{request}"),
		metric.WithDescription("Callers waiting for a token."))
	keep(e)
	m.budgetEvictions, e = meter.Int64ObservableCounter("tenantpg.budget.evictions", metric.WithUnit("{connection}"),
		metric.WithDescription("Connections the driver closed, by tenantpg.eviction.reason."))
	keep(e)
	m.budgetDialErrors, e = meter.Int64ObservableCounter("tenantpg.budget.dial_errors", metric.WithUnit("{error}"),
		metric.WithDescription("Failed dials, by error.type: 53300 when the server had no connection slot left, _OTHER otherwise."))
	keep(e)
	m.budgetExhausted, e = meter.Int64ObservableCounter("tenantpg.budget.exhausted", metric.WithUnit("{error}"),
		metric.WithDescription("Callers that got ErrBudgetExhausted."))
	keep(e)
	m.serverDown, e = meter.Int64ObservableGauge("tenantpg.server.down", metric.WithUnit("1"),
		metric.WithDescription("1 while the server (server.address, server.port) is down: its callers wait for one probe dial at a time; 0 while up."))
	keep(e)
	m.serverDownTime, e = meter.Float64ObservableGauge("tenantpg.server.down_time", metric.WithUnit("s"),
		metric.WithDescription("How long the server has been down; 0 while up."))
	keep(e)
	m.serverWaiters, e = meter.Int64ObservableUpDownCounter("tenantpg.server.waiters", metric.WithUnit("{request}"),
		metric.WithDescription("Callers waiting on the server's databases: for a backend, a token, or a down server to come back."))
	keep(e)
	m.serverLimit, e = meter.Int64ObservableUpDownCounter("tenantpg.server.limit", metric.WithUnit("{connection}"),
		metric.WithDescription("The server's budget: the most connections the driver holds to it across its databases."))
	keep(e)
	m.serverConnections, e = meter.Int64ObservableUpDownCounter("tenantpg.server.connections", metric.WithUnit("{connection}"),
		metric.WithDescription("Tokens of the server's budget held, by tenantpg.connection.state: used, idle, dialing, closing."))
	keep(e)
	m.serverDialSlots, e = meter.Int64ObservableUpDownCounter("tenantpg.server.dial_slots", metric.WithUnit("{connection}"),
		metric.WithDescription("Dials the pacing lets start at once on the server (evictions for a dial included)."))
	keep(e)
	m.fleetShare, e = meter.Int64ObservableUpDownCounter("tenantpg.fleet.share", metric.WithUnit("{connection}"),
		metric.WithDescription("Slots of the fleet budget this process holds for connections to the server (its coordination session's not included)."))
	keep(e)
	m.fleetMembers, e = meter.Int64ObservableUpDownCounter("tenantpg.fleet.members", metric.WithUnit("{process}"),
		metric.WithDescription("Processes sharing the fleet budget, as last counted."))
	keep(e)
	m.fleetSquatted, e = meter.Int64ObservableUpDownCounter("tenantpg.fleet.squatted", metric.WithUnit("{connection}"),
		metric.WithDescription("Slots of the fleet budget held by sessions of other roles, as last counted; while above 0 the process may hold one connection beyond its share."))
	keep(e)
	m.fleetConnected, e = meter.Int64ObservableGauge("tenantpg.fleet.connected", metric.WithUnit("1"),
		metric.WithDescription("1 while the coordination session is up; 0 while the process falls back to a safe local share."))
	keep(e)
	m.fleetLeased, e = meter.Int64ObservableCounter("tenantpg.fleet.leased", metric.WithUnit("{connection}"),
		metric.WithDescription("Slots leased from the fleet budget."))
	keep(e)
	m.fleetReleased, e = meter.Int64ObservableCounter("tenantpg.fleet.released", metric.WithUnit("{connection}"),
		metric.WithDescription("Slots given back to the fleet budget, those lost with a session included."))
	keep(e)
	m.fleetRoundTrips, e = meter.Int64ObservableCounter("tenantpg.fleet.round_trips", metric.WithUnit("{statement}"),
		metric.WithDescription("Statements run on the coordination session."))
	keep(e)
	m.fleetFailures, e = meter.Int64ObservableCounter("tenantpg.fleet.failures", metric.WithUnit("{error}"),
		metric.WithDescription("Coordination sessions that failed to connect or were lost."))
	keep(e)
	m.budgetLeaks, e = meter.Int64ObservableCounter("tenantpg.budget.suspected_leaks", metric.WithUnit("{connection}"),
		metric.WithDescription("Connections held longer than the leak threshold, each counted once."))
	keep(e)
	if err != nil {
		return nil, err
	}
	with := func(kvs ...attribute.KeyValue) metric.MeasurementOption {
		return metric.WithAttributeSet(attribute.NewSet(append(m.driverSet.ToSlice(), kvs...)...))
	}
	for i, s := range connStates {
		m.stateAttrs[i] = with(attrConnState.String(s))
	}
	for r := reasonNone + 1; r < numReasons; r++ {
		m.reasonOpts[r] = with(attrEvictionReason.String(reasonNames[r]))
	}
	m.dialOpts[dialRejected] = with(semconv.ErrorTypeKey.String("53300"))
	m.dialOpts[dialOther] = with(semconv.ErrorTypeOther)
	m.dialOpts[dialDown] = with(semconv.ErrorTypeKey.String("server_down"))

	m.reg, err = meter.RegisterCallback(func(ctx context.Context, o metric.Observer) error {
		m.observe(o, b)
		return nil
	}, m.count.Inst(), m.max.Inst(), m.idleMax.Inst(), m.pending.Inst(), m.budgetLimit, m.budgetConnections,
		m.budgetWaiters, m.budgetEvictions, m.budgetDialErrors, m.budgetExhausted, m.budgetLeaks, m.serverDown, m.serverDownTime, m.serverWaiters,
		m.serverLimit, m.serverConnections, m.serverDialSlots,
		m.fleetShare, m.fleetMembers, m.fleetSquatted, m.fleetConnected, m.fleetLeased, m.fleetReleased, m.fleetRoundTrips, m.fleetFailures)
	if err != nil {
		return nil, err
	}
	return m, nil
}

// dbMetricOpts are a database's attribute sets, built once while it holds
// backends so that a collection allocates nothing per database.
type dbMetricOpts struct {
	base, idle, used metric.MeasurementOption
}

func newDBMetricOpts(workspace, name string) *dbMetricOpts {
	kvs := []attribute.KeyValue{semconv.DBClientConnectionPoolName(workspace), semconv.DBSystemNamePostgreSQL, semconv.DBNamespace(name)}
	with := func(extra ...attribute.KeyValue) metric.MeasurementOption {
		return metric.WithAttributeSet(attribute.NewSet(append(append([]attribute.KeyValue(nil), kvs...), extra...)...))
	}
	return &dbMetricOpts{
		base: with(),
		idle: with(semconv.DBClientConnectionStateIdle),
		used: with(semconv.DBClientConnectionStateUsed),
	}
}

// connStates name the states of a budget's connections, in the order the
// observations use.
var connStates = [4]string{"used", "idle", "dialing", "closing"}

// serverMetricOpts is a server's attribute set, built once per set of
// instruments (it carries the driver's name) so that a collection
// allocates nothing per server.
type serverMetricOpts struct {
	m      *metrics
	base   metric.MeasurementOption
	states [4]metric.MeasurementOption // its connections by state, as stateAttrs
}

func (m *metrics) serverOpts(s *server) *serverMetricOpts {
	if opts := s.metricOpts.Load(); opts != nil && opts.m == m {
		return opts
	}
	kvs := append(m.driverSet.ToSlice(), semconv.ServerAddress(s.key.host), semconv.ServerPort(int(s.key.port)))
	opts := &serverMetricOpts{m: m, base: metric.WithAttributeSet(attribute.NewSet(kvs...))}
	for i, state := range connStates {
		opts.states[i] = metric.WithAttributeSet(attribute.NewSet(append(kvs[:len(kvs):len(kvs)], attrConnState.String(state))...))
	}
	s.metricOpts.Store(opts)
	return opts
}

// observe reports the budget and every database holding backends or with
// callers waiting, from a snapshot.
func (m *metrics) observe(o metric.Observer, b *budget) {
	s := b.snapshot()
	// Pools of one workspace label and database (two *sql.DBs of one DSN)
	// are reported as one: their attribute sets are equal, and an
	// asynchronous instrument keeps one observation per set. So are those
	// of a label reused across pools; the pool name is the application's
	// label, which keeps the metrics' cardinality the application's.
	slices.SortFunc(s.dbs, func(x, y dbSnapshot) int {
		return cmp.Or(cmp.Compare(x.workspace, y.workspace), cmp.Compare(x.name, y.name))
	})
	for i := 0; i < len(s.dbs); {
		d := s.dbs[i]
		var sum dbSnapshot
		for ; i < len(s.dbs) && s.dbs[i].workspace == d.workspace && s.dbs[i].name == d.name; i++ {
			x := &s.dbs[i]
			sum.open += x.open
			sum.idle += x.idle
			sum.dialing += x.dialing
			sum.cap += x.cap
			sum.waiting += x.waiting
		}
		if sum.open == 0 && sum.waiting == 0 {
			continue // reserving only
		}
		opts := d.db.metricOpts.Load()
		if opts == nil {
			opts = newDBMetricOpts(d.workspace, d.name)
			d.db.metricOpts.Store(opts)
		}
		// A backend being dialed is not one yet; one being closed still
		// holds its server process.
		o.ObserveInt64(m.count.Inst(), int64(sum.idle), opts.idle)
		o.ObserveInt64(m.count.Inst(), int64(sum.open-sum.idle-sum.dialing), opts.used)
		o.ObserveInt64(m.max.Inst(), int64(sum.cap), opts.base)
		o.ObserveInt64(m.idleMax.Inst(), int64(sum.cap), opts.base)
		o.ObserveInt64(m.pending.Inst(), int64(sum.waiting), opts.base)
	}
	o.ObserveInt64(m.budgetLimit, int64(s.limit), m.driverOpt)
	for i, v := range []int{s.open - s.idle - s.dialing - s.closing, s.idle, s.dialing, s.closing} {
		o.ObserveInt64(m.budgetConnections, int64(v), m.stateAttrs[i])
	}
	o.ObserveInt64(m.budgetWaiters, int64(s.waiting), m.driverOpt)
	for r := reasonNone + 1; r < numReasons; r++ {
		o.ObserveInt64(m.budgetEvictions, int64(s.counters.evictions[r]), m.reasonOpts[r])
	}
	for k := dialErrorKind(0); k < numDialErrorKinds; k++ {
		o.ObserveInt64(m.budgetDialErrors, int64(s.counters.dialErrors[k]), m.dialOpts[k])
	}
	o.ObserveInt64(m.budgetExhausted, int64(s.counters.exhausted), m.driverOpt)
	for _, x := range s.servers {
		opts := m.serverOpts(x.srv)
		down := int64(0)
		if x.down {
			down = 1
		}
		o.ObserveInt64(m.serverDown, down, opts.base)
		o.ObserveFloat64(m.serverDownTime, x.downFor.Seconds(), opts.base)
		o.ObserveInt64(m.serverWaiters, int64(x.waiting), opts.base)
		o.ObserveInt64(m.serverLimit, int64(x.limit), opts.base)
		for i, v := range []int{x.open - x.idle - x.dialing - x.closing, x.idle, x.dialing, x.closing} {
			o.ObserveInt64(m.serverConnections, int64(v), opts.states[i])
		}
		o.ObserveInt64(m.serverDialSlots, int64(x.dialSlots), opts.base)
		if f := x.fleet; f != nil {
			connected := int64(0)
			if f.Connected {
				connected = 1
			}
			o.ObserveInt64(m.fleetShare, int64(f.Share), opts.base)
			o.ObserveInt64(m.fleetMembers, int64(f.Members), opts.base)
			squatted := 0
			for _, q := range f.Squatters {
				squatted += q.Slots
			}
			o.ObserveInt64(m.fleetSquatted, int64(squatted), opts.base)
			o.ObserveInt64(m.fleetConnected, connected, opts.base)
			o.ObserveInt64(m.fleetLeased, int64(f.Leased), opts.base)
			o.ObserveInt64(m.fleetReleased, int64(f.Released), opts.base)
			o.ObserveInt64(m.fleetRoundTrips, int64(f.RoundTrips), opts.base)
			o.ObserveInt64(m.fleetFailures, int64(f.Failures), opts.base)
		}
	}
	o.ObserveInt64(m.budgetLeaks, int64(s.counters.leaks), m.driverOpt)
}

func (m *metrics) close() {
	if m != nil && m.reg != nil {
		_ = m.reg.Unregister()
	}
}

var bg = context.Background()

// sameProvider compares providers without panicking on a provider whose
// dynamic type is not comparable.
func sameProvider(a, b metric.MeterProvider) (same bool) {
	defer func() {
		if recover() != nil {
			same = false
		}
	}()
	return a == b
}

// The record methods do nothing on a nil *metrics, for a driver whose
// instruments could not be created.

func (m *metrics) recordCreate(d time.Duration) {
	if m != nil {
		m.createTime.Inst().Record(bg, d.Seconds(), m.recordOpts...)
	}
}

func (m *metrics) recordWait(d time.Duration) {
	if m != nil {
		m.waitTime.Inst().Record(bg, d.Seconds(), m.recordOpts...)
	}
}

func (m *metrics) recordUse(d time.Duration) {
	if m != nil {
		m.useTime.Inst().Record(bg, d.Seconds(), m.recordOpts...)
	}
}

func (m *metrics) recordTimeout() {
	if m != nil {
		m.timeouts.Inst().Add(bg, 1, m.addOpts...)
	}
}

// setupMetrics (re)creates the driver's instruments when the provider or
// the name changed.
func (d *Driver) setupMetrics(mp metric.MeterProvider, name string) error {
	if d.metricsSet && sameProvider(mp, d.meterProvider) && name == d.name {
		return nil
	}
	if d.b.isClosed() {
		return nil // a closed driver reports nothing; registering would leak
	}
	m, err := newMetrics(mp, name, d.b)
	if err != nil {
		return err
	}
	d.b.metrics.Swap(m).close()
	d.meterProvider, d.name, d.metricsSet = mp, name, true
	return nil
}
