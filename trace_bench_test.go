package tenantpg

import (
	"context"
	"testing"

	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/trace"
	"go.opentelemetry.io/otel/trace/noop"
)

// BenchmarkStatementSpan is what tracing adds to every statement, with no
// provider installed (the global default), the no-op provider, and an SDK
// provider that samples nothing or everything.
func BenchmarkStatementSpan(b *testing.B) {
	for _, p := range []struct {
		name string
		tp   trace.TracerProvider
	}{
		{"global-unset", nil},
		{"noop", noop.NewTracerProvider()},
		{"sdk-never-sample", sdktrace.NewTracerProvider(sdktrace.WithSampler(sdktrace.NeverSample()))},
		{"sdk-always-sample", sdktrace.NewTracerProvider(sdktrace.WithSampler(sdktrace.AlwaysSample()))},
	} {
		b.Run(p.name, func(b *testing.B) {
			bg := newBudget(Config{MaxConnections: 1, TracerProvider: p.tp}, realClock{}, nopIO{})
			c := &conn{b: bg, fixed: &connector{workspace: "abc"}}
			ctx := context.Background()
			b.ReportAllocs()
			for b.Loop() {
				_, span := c.startStatement(ctx, "SELECT", "SELECT 1")
				c.endStatement(span, nil, nil)
			}
		})
	}
}
