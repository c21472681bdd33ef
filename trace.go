package tenantpg

import (
	"context"
	"errors"
	"reflect"
	"strings"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	semconv "go.opentelemetry.io/otel/semconv/v1.43.0"
	"go.opentelemetry.io/otel/trace"
	"go.opentelemetry.io/otel/trace/noop"
)

// Traces: a client span per statement (semconv db.* attributes), and, for
// a checkout that could not take an idle backend at once, a
// tenantpg.acquire span that says where the time went: queued for a
// backend of the database, queued in the budget for a dial slot and a
// token, which workspace was evicted to make room, and the dial. The acquire span is
// built after the fact from the waiter's timestamps, so a checkout that
// waits costs no tracing calls while it waits, and one served from the
// idle list costs none at all.

// Attribute keys of tenantpg's own.
const (
	attrWorkspace        = attribute.Key("tenantpg.workspace")
	attrEvictedWorkspace = attribute.Key("tenantpg.evicted.workspace")
	attrOutcome          = attribute.Key("tenantpg.acquire.outcome")
)

// tracing hands out the tracer of Config.TracerProvider or, when that is
// unset, of the global provider as it is now: an application may install
// one after the driver is made. With neither, or a no-op provider, it
// hands out none and statements skip tracing: a span from the global
// default costs about 220ns and five allocations (BenchmarkStatementSpan).
type tracing struct {
	fixed     trace.Tracer // from Config.TracerProvider
	follow    bool         // Config.TracerProvider unset: follow the global provider
	queryText bool         // Config.TraceQueryText
	fromGlob  atomic.Pointer[globalTracer]
}

type globalTracer struct {
	tp         trace.TracerProvider
	tracer     trace.Tracer
	comparable bool // tp's dynamic type supports ==
}

// unsetGlobal is what otel.GetTracerProvider returns until the application
// installs a provider: a delegating no-op.
var unsetGlobal = otel.GetTracerProvider()

func newTracing(tp trace.TracerProvider, queryText bool) *tracing {
	switch tp.(type) {
	case nil:
		return &tracing{follow: true, queryText: queryText}
	case noop.TracerProvider, *noop.TracerProvider:
		return &tracing{}
	}
	return &tracing{fixed: tracerOf(tp), queryText: queryText}
}

func tracerOf(tp trace.TracerProvider) trace.Tracer {
	return tp.Tracer(instrumentationName, trace.WithInstrumentationVersion(Version), trace.WithSchemaURL(semconv.SchemaURL))
}

// tracer returns the tracer to use now, or nil for none.
func (t *tracing) tracer() trace.Tracer {
	if !t.follow {
		return t.fixed
	}
	tp := otel.GetTracerProvider()
	if tp == unsetGlobal {
		return nil
	}
	// Comparing providers of a non-comparable type would panic: such a
	// provider's tracer is fetched anew each time.
	if g := t.fromGlob.Load(); g != nil && g.comparable && g.tp == tp {
		return g.tracer
	}
	g := &globalTracer{tp: tp, tracer: tracerOf(tp), comparable: reflect.TypeOf(tp).Comparable()}
	t.fromGlob.Store(g)
	return g.tracer
}

// operationName is the statement's first keyword, as PostgreSQL's command
// tags name it: a slice of the query, so naming a span allocates nothing.
func operationName(query string) string {
	i := 0
	for i < len(query) && (query[i] == ' ' || query[i] == '\t' || query[i] == '\n' || query[i] == '\r' || query[i] == '(') {
		i++
	}
	j := i
	for j < len(query) && (query[j]|0x20 >= 'a' && query[j]|0x20 <= 'z') {
		j++
	}
	if j == i {
		return "query"
	}
	return query[i:j]
}

// sanitizeQuery replaces the literals of a statement, strings (with their
// E, B, X, N or U& prefix) and dollar-quoted strings and numbers, with ?.
// Identifiers, quoted ones included, keywords, comments and parameters
// ($1) stay. It lexes as PostgreSQL does with standard_conforming_strings
// on; an unterminated literal swallows the rest of the text.
func sanitizeQuery(q string) string {
	out := make([]byte, 0, len(q))
	identByte := func(c byte) bool {
		return c == '_' || c == '$' || c >= '0' && c <= '9' || c|0x20 >= 'a' && c|0x20 <= 'z' || c >= 0x80
	}
	// A digit or dollar that continues an identifier (t1, a$1) is no
	// literal.
	startsToken := func(i int) bool { return i == 0 || !identByte(q[i-1]) }
	for i := 0; i < len(q); {
		c := q[i]
		switch {
		case c == '\'':
			// A prefix (E'...', X'...', U&'...') belongs to the literal.
			escapes := false
			n := len(out)
			switch {
			case n >= 2 && out[n-1] == '&' && out[n-2]|0x20 == 'u' && (n == 2 || !identByte(out[n-3])):
				out = out[:n-2]
			case n >= 1 && strings.IndexByte("eEbBxXnN", out[n-1]) >= 0 && (n == 1 || !identByte(out[n-2])):
				escapes = out[n-1]|0x20 == 'e'
				out = out[:n-1]
			}
			i = skipString(q, i+1, escapes)
			out = append(out, '?')
		case c == '"':
			j := skipQuoted(q, i+1)
			out = append(out, q[i:j]...)
			i = j
		case c == '$' && startsToken(i):
			tag, ok := dollarTag(q[i:])
			if !ok {
				// A parameter ($1): its digits follow as part of it.
				out = append(out, c)
				for i++; i < len(q) && q[i] >= '0' && q[i] <= '9'; i++ {
					out = append(out, q[i])
				}
				continue
			}
			if end := strings.Index(q[i+len(tag):], tag); end >= 0 {
				i += len(tag) + end + len(tag)
			} else {
				i = len(q)
			}
			out = append(out, '?')
		case c == '-' && strings.HasPrefix(q[i:], "--"):
			j := strings.IndexByte(q[i:], '\n')
			if j < 0 {
				j = len(q) - i
			}
			out = append(out, q[i:i+j]...)
			i += j
		case c == '/' && strings.HasPrefix(q[i:], "/*"):
			j := skipBlockComment(q, i+2)
			out = append(out, q[i:j]...)
			i = j
		case startsToken(i) && (c >= '0' && c <= '9' || c == '.' && i+1 < len(q) && q[i+1] >= '0' && q[i+1] <= '9'):
			i = skipNumber(q, i)
			out = append(out, '?')
		default:
			out = append(out, c)
			i++
		}
	}
	return string(out)
}

// skipString returns the index after the string literal whose text starts
// at q[i], or len(q) if it never ends. A doubled quote is a quote; escapes:
// an E'...' string, in which a backslash escapes the next byte.
func skipString(q string, i int, escapes bool) int {
	for i < len(q) {
		switch {
		case escapes && q[i] == '\\':
			i += 2
		case q[i] == '\'' && i+1 < len(q) && q[i+1] == '\'':
			i += 2
		case q[i] == '\'':
			return i + 1
		default:
			i++
		}
	}
	return len(q)
}

// skipQuoted returns the index after the quoted identifier whose text
// starts at q[i].
func skipQuoted(q string, i int) int {
	for i < len(q) {
		if q[i] == '"' {
			if i+1 < len(q) && q[i+1] == '"' {
				i += 2
				continue
			}
			return i + 1
		}
		i++
	}
	return len(q)
}

// skipBlockComment returns the index after the comment whose text starts
// at q[i]; PostgreSQL's block comments nest.
func skipBlockComment(q string, i int) int {
	for depth := 1; i < len(q); {
		switch {
		case strings.HasPrefix(q[i:], "/*"):
			depth++
			i += 2
		case strings.HasPrefix(q[i:], "*/"):
			depth--
			i += 2
			if depth == 0 {
				return i
			}
		default:
			i++
		}
	}
	return len(q)
}

// dollarTag returns the opening tag of a dollar-quoted string at the start
// of s: $$ or $tag$, the tag not starting with a digit.
func dollarTag(s string) (string, bool) {
	for j := 1; j < len(s); j++ {
		c := s[j]
		switch {
		case c == '$':
			return s[:j+1], true
		case c == '_' || c|0x20 >= 'a' && c|0x20 <= 'z' || c >= 0x80 || j > 1 && c >= '0' && c <= '9':
		default:
			return "", false
		}
	}
	return "", false
}

// skipNumber returns the index after the numeric literal at q[i]: decimal
// with a fraction and exponent, or 0x, 0o, 0b, with _ between digits.
func skipNumber(q string, i int) int {
	if i+1 < len(q) && q[i] == '0' && strings.ContainsRune("xXoObB", rune(q[i+1])) {
		i += 2
		for i < len(q) && (q[i] == '_' || q[i] >= '0' && q[i] <= '9' || q[i]|0x20 >= 'a' && q[i]|0x20 <= 'f') {
			i++
		}
		return i
	}
	digits := func() {
		for i < len(q) && (q[i] >= '0' && q[i] <= '9' || q[i] == '_') {
			i++
		}
	}
	digits()
	if i < len(q) && q[i] == '.' {
		i++
		digits()
	}
	if i < len(q) && q[i]|0x20 == 'e' {
		j := i + 1
		if j < len(q) && (q[j] == '+' || q[j] == '-') {
			j++
		}
		if j < len(q) && q[j] >= '0' && q[j] <= '9' {
			i = j
			digits()
		}
	}
	return i
}

// startStatement starts a statement's span, named op or, when op is empty,
// after the query's first keyword. With no provider installed it does
// nothing else; attributes are set only on a recording span.
func (c *conn) startStatement(ctx context.Context, op, query string) (context.Context, trace.Span) {
	t := c.b.tracing.Load()
	tr := t.tracer()
	if tr == nil {
		return ctx, nil
	}
	if op == "" {
		op = operationName(query)
	}
	ctx, span := tr.Start(ctx, op, trace.WithSpanKind(trace.SpanKindClient))
	if span.IsRecording() {
		attrs := []attribute.KeyValue{semconv.DBSystemNamePostgreSQL, semconv.DBOperationName(op)}
		if query != "" && t.queryText {
			attrs = append(attrs, semconv.DBQueryText(sanitizeQuery(query)))
		}
		span.SetAttributes(attrs...)
	}
	return ctx, span
}

// endStatement records where the statement ran and how it ended.
func (c *conn) endStatement(span trace.Span, be *backend, err error) {
	if span == nil {
		return
	}
	if span.IsRecording() {
		if be != nil {
			ws := c.ws
			if c.fixed != nil {
				ws = c.fixed.workspace
			}
			cfg := be.pc.Conn().Config()
			span.SetAttributes(semconv.DBNamespace(be.db.name), attrWorkspace.String(ws),
				semconv.ServerAddress(cfg.Host), semconv.ServerPort(int(cfg.Port)))
		}
		if err != nil {
			span.RecordError(err)
			span.SetStatus(codes.Error, "")
			var pgErr *pgconn.PgError
			if errors.As(err, &pgErr) {
				span.SetAttributes(semconv.DBResponseStatusCode(pgErr.Code))
			}
		}
	}
	span.End()
}

// acquireTrace is what a checkout that waited knows of its wait, read from
// its waiter once served.
type acquireTrace struct {
	workspace, database string
	queued              time.Time // the checkout started waiting
	sought              time.Time // it joined the budget's queue to dial; zero if never
	evicted             string    // workspace whose idle backend was closed for its token
	slotted             time.Time // it got a dial slot (and a free token or a victim); zero if never
	dialStart, dialEnd  time.Time // of its last dial; zero if it did not dial
	downAt              time.Time // its dial found the server down, and it waited for the circuit
	end                 time.Time
	outcome             string // handoff, dialed, idle (after the server came back) or failed
	err                 error
}

// record emits the acquire span and its dial child under ctx, with the
// timestamps of the injected clock.
func (t *tracing) record(ctx context.Context, a *acquireTrace) {
	tr := t.tracer()
	if tr == nil {
		return
	}
	ctx, span := tr.Start(ctx, "tenantpg.acquire", trace.WithTimestamp(a.queued), trace.WithSpanKind(trace.SpanKindInternal))
	if !span.IsRecording() {
		span.End()
		return
	}
	span.SetAttributes(semconv.DBSystemNamePostgreSQL, semconv.DBNamespace(a.database),
		attrWorkspace.String(a.workspace), attrOutcome.String(a.outcome))
	if !a.sought.IsZero() {
		// Until here it waited for a backend of its database to be
		// checked in; from here, for a token of the budget.
		span.AddEvent("tenantpg.budget.queued", trace.WithTimestamp(a.sought))
	}
	if !a.slotted.IsZero() {
		// From budget.queued until here it waited for one of the dial
		// slots (dial pacing); from here until token.granted, for the
		// evicted backend to close.
		span.AddEvent("tenantpg.dial_slot.granted", trace.WithTimestamp(a.slotted))
	}
	if a.evicted != "" {
		span.SetAttributes(attrEvictedWorkspace.String(a.evicted))
	}
	if !a.downAt.IsZero() {
		span.AddEvent("tenantpg.server.down", trace.WithTimestamp(a.downAt))
	}
	if !a.dialStart.IsZero() {
		span.AddEvent("tenantpg.token.granted", trace.WithTimestamp(a.dialStart))
		_, dial := tr.Start(ctx, "tenantpg.dial", trace.WithTimestamp(a.dialStart), trace.WithSpanKind(trace.SpanKindClient))
		dial.SetAttributes(semconv.DBSystemNamePostgreSQL, semconv.DBNamespace(a.database))
		if a.err != nil {
			dial.SetStatus(codes.Error, "")
		}
		dial.End(trace.WithTimestamp(a.dialEnd))
	}
	if a.err != nil {
		span.RecordError(a.err, trace.WithTimestamp(a.end))
		span.SetStatus(codes.Error, "")
	}
	span.End(trace.WithTimestamp(a.end))
}
