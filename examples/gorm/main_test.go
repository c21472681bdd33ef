package main

import (
	"bytes"
	"context"
	"strings"
	"testing"

	"github.com/tenantpg/tenantpg/examples/internal/demo"
)

func TestGorm(t *testing.T) {
	var out bytes.Buffer
	err := run(context.Background(), 12, 4, &out)
	demo.CheckRun(t, err, out.String())
	if !strings.Contains(out.String(), "12 workspaces migrated") || !strings.Contains(out.String(), "budget of 4") {
		t.Fatalf("unexpected output:\n%s", out.String())
	}
	t.Log(out.String())
}
