package tenantpg

import (
	"context"
	"fmt"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"

	"github.com/tenantpg/tenantpg/internal/pgtest"
)

func spanAttrs(s sdktrace.ReadOnlySpan) map[attribute.Key]string {
	m := map[attribute.Key]string{}
	for _, kv := range s.Attributes() {
		m[kv.Key] = kv.Value.Emit()
	}
	return m
}

func spansNamed(spans []sdktrace.ReadOnlySpan, name string) []sdktrace.ReadOnlySpan {
	var out []sdktrace.ReadOnlySpan
	for _, s := range spans {
		if s.Name() == name {
			out = append(out, s)
		}
	}
	return out
}

// TestTraces: statement spans carry the semconv db.* attributes and the
// workspace; a checkout that waited or dialed leaves a tenantpg.acquire
// span saying how (hand-off, or a dial after evicting another workspace);
// no span carries a password or a DSN.
func TestTraces(t *testing.T) {
	exp := tracetest.NewInMemoryExporter()
	tp := sdktrace.NewTracerProvider(sdktrace.WithSyncer(exp), sdktrace.WithSampler(sdktrace.AlwaysSample()))
	defer tp.Shutdown(context.Background())
	e := newEnv(t, 2, Config{MaxConnections: 1, MaxConnectionsPerDB: 1, TracerProvider: tp})
	db0, db1 := e.open(0), e.open(1)
	bg := context.Background()
	ctx, parent := tp.Tracer("test").Start(bg, "request")

	var n int
	require.NoError(t, db0.QueryRowContext(ctx, "SELECT 1").Scan(&n))
	// The budget's one token is ws0's idle backend: ws1's dial evicts it.
	require.NoError(t, db1.QueryRowContext(ctx, "SELECT 2").Scan(&n))
	require.Error(t, db1.QueryRowContext(ctx, "SELEC 3").Scan(&n))

	// A second caller of ws1 waits for the pinned backend and gets it by
	// hand-off.
	pinned, err := db1.Conn(ctx)
	require.NoError(t, err)
	require.NoError(t, pinned.PingContext(ctx))
	done := make(chan error, 1)
	go func() { done <- db1.QueryRowContext(ctx, "SELECT 4").Scan(new(int)) }()
	require.Eventually(t, func() bool { return e.drv.Stats().Waiting == 1 }, e2eWait, pollEvery)
	require.NoError(t, pinned.Close())
	require.NoError(t, <-done)
	parent.End()

	spans := exp.GetSpans().Snapshots()
	acquires := spansNamed(spans, "tenantpg.acquire")
	require.Len(t, acquires, 3, "two dials and one hand-off")
	byOutcome := map[string][]sdktrace.ReadOnlySpan{}
	for _, s := range acquires {
		a := spanAttrs(s)
		byOutcome[a[attrOutcome]] = append(byOutcome[a[attrOutcome]], s)
		require.Equal(t, parent.SpanContext().TraceID(), s.SpanContext().TraceID())
	}
	require.Len(t, byOutcome["dialed"], 2)
	require.Len(t, byOutcome["handoff"], 1)
	evicted := spanAttrs(byOutcome["dialed"][1])
	require.Equal(t, "ws1", evicted[attrWorkspace])
	require.Equal(t, "ws0", evicted[attrEvictedWorkspace], "the acquire span names the workspace evicted for its token")
	for _, s := range byOutcome["dialed"] {
		var events []string
		for _, ev := range s.Events() {
			events = append(events, ev.Name)
		}
		require.Contains(t, events, "tenantpg.token.granted")
		require.Contains(t, events, "tenantpg.dial_slot.granted")
	}
	require.Len(t, spansNamed(spans, "tenantpg.dial"), 2)
	for _, d := range spansNamed(spans, "tenantpg.dial") {
		require.False(t, d.StartTime().After(d.EndTime()))
	}
	h := byOutcome["handoff"][0]
	require.Greater(t, h.EndTime().Sub(h.StartTime()), int64(0), "the hand-off span covers the wait")

	selects := spansNamed(spans, "SELECT")
	require.Len(t, selects, 3)
	for i, s := range selects {
		a := spanAttrs(s)
		require.Equal(t, "postgresql", a["db.system.name"])
		require.Equal(t, e.dbs[min(i, 1)], a["db.namespace"])
		require.Equal(t, fmt.Sprintf("ws%d", min(i, 1)), a[attrWorkspace])
		require.Equal(t, "SELECT", a["db.operation.name"])
		require.NotEmpty(t, a["server.address"])
	}
	bad := spansNamed(spans, "SELEC")
	require.Len(t, bad, 1)
	require.Equal(t, codes.Error, bad[0].Status().Code)
	require.Equal(t, "42601", spanAttrs(bad[0])["db.response.status_code"])

	dsn := e.dsn(0)
	for _, s := range spans {
		texts := []string{s.Name(), s.Status().Description}
		for _, kv := range s.Attributes() {
			texts = append(texts, kv.Value.Emit())
		}
		for _, ev := range s.Events() {
			for _, kv := range ev.Attributes {
				texts = append(texts, kv.Value.Emit())
			}
		}
		for _, txt := range texts {
			require.NotContains(t, txt, testPassword)
			require.NotContains(t, txt, dsn)
			require.False(t, strings.Contains(txt, "postgres://"), "span %s carries a URL: %s", s.Name(), txt)
		}
	}
	e.requireQuiescent()
}

// TestTracingOffByDefault: with no provider in Config and none installed
// globally the driver starts no spans.
func TestTracingOffByDefault(t *testing.T) {
	e := newEnv(t, 1, Config{MaxConnections: 1})
	c := &conn{b: e.drv.b}
	_, span := c.startStatement(context.Background(), "SELECT", "SELECT 1")
	require.Nil(t, span, "no provider installed: no span")
	db := e.open(0)
	require.NoError(t, db.PingContext(context.Background()))
}

// TestQueryTextNotTracedByDefault: a statement's text stays out of its span
// unless Config.TraceQueryText is set, and then only with its literals
// replaced, so a password set with ALTER ROLE reaches no trace either way.
func TestQueryTextNotTracedByDefault(t *testing.T) {
	exp := tracetest.NewInMemoryExporter()
	tp := sdktrace.NewTracerProvider(sdktrace.WithSyncer(exp), sdktrace.WithSampler(sdktrace.AlwaysSample()))
	defer tp.Shutdown(context.Background())
	cfg := Config{MaxConnections: 1, TracerProvider: tp}
	e := newEnv(t, 1, cfg)
	db := e.open(0)
	ctx := context.Background()
	// The role's own password, set again: later dials still log in.
	alter := "ALTER ROLE " + pgtest.QuoteIdent(e.role) + " PASSWORD '" + testPassword + "'"
	run := func() {
		t.Helper()
		_, err := db.ExecContext(ctx, alter)
		require.NoError(t, err)
		require.NoError(t, db.QueryRowContext(ctx, "SELECT v FROM kv WHERE id = 3 AND v <> 'v1'").Scan(new(string)))
	}
	texts := func() map[string]string {
		t.Helper()
		got := map[string]string{}
		for _, s := range exp.GetSpans().Snapshots() {
			for _, kv := range s.Attributes() {
				require.NotContains(t, kv.Value.Emit(), testPassword, "span %s", s.Name())
				if kv.Key == "db.query.text" {
					got[s.Name()] = kv.Value.Emit()
				}
			}
		}
		exp.Reset()
		return got
	}

	run()
	require.Empty(t, texts(), "no db.query.text by default")

	cfg.TraceQueryText = true
	require.NoError(t, e.drv.Configure(cfg))
	run()
	require.Equal(t, map[string]string{
		"ALTER":  "ALTER ROLE " + pgtest.QuoteIdent(e.role) + " PASSWORD ?",
		"SELECT": "SELECT v FROM kv WHERE id = ? AND v <> ?",
	}, texts())
}

func TestSanitizeQuery(t *testing.T) {
	for in, want := range map[string]string{
		"SELECT 1":            "SELECT ?",
		"SELECT $1, $22::int": "SELECT $1, $22::int",
		"SELECT t1.c2 FROM t1 WHERE x > 1.5e-3 AND y = .5": "SELECT t1.c2 FROM t1 WHERE x > ? AND y = ?",
		"SELECT 0x1F, 1_000":                             "SELECT ?, ?",
		"ALTER ROLE app PASSWORD 'it''s secret'":         "ALTER ROLE app PASSWORD ?",
		"SELECT E'a\\'b', 'c'":                           "SELECT ?, ?",
		"SELECT e'x', X'1F', B'01', N'n', U&'d\\0061'":   "SELECT ?, ?, ?, ?, ?",
		`SELECT "we're"."col1" FROM "t""x"`:              `SELECT "we're"."col1" FROM "t""x"`,
		"SELECT $$sec'ret$$, $tag$a$$b$tag$":             "SELECT ?, ?",
		"SELECT 1 -- it's 2\nFROM t /* a 'b' /* 3 */ */": "SELECT ? -- it's 2\nFROM t /* a 'b' /* 3 */ */",
		"SELECT 'unterminated secret":                    "SELECT ?",
		"SELECT $t$ unterminated":                        "SELECT ?",
		"SELECT a$1 FROM t":                              "SELECT a$1 FROM t",
		"SELECT ARRAY[1,2], interval '1 day'":            "SELECT ARRAY[?,?], interval ?",
	} {
		require.Equal(t, want, sanitizeQuery(in), in)
	}
}
