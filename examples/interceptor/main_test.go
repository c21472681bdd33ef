package main

import (
	"bytes"
	"context"
	"strings"
	"testing"

	"github.com/tenantpg/tenantpg/examples/internal/demo"
)

func TestInterceptor(t *testing.T) {
	var out bytes.Buffer
	err := run(context.Background(), 3, 2, &out)
	demo.CheckRun(t, err, out.String())
	if got := strings.Count(out.String(), ": 3 statements, tagged"); got != 3 {
		t.Fatalf("want 3 workspaces with 3 tagged statements each:\n%s", out.String())
	}
	if !strings.Contains(out.String(), "budget of 2") {
		t.Fatalf("unexpected output:\n%s", out.String())
	}
}
