package main

import (
	"bytes"
	"context"
	"errors"
	"os"
	"strings"
	"testing"

	"github.com/tenantpg/tenantpg/internal/pgtest"
)

func TestGorm(t *testing.T) {
	var out bytes.Buffer
	err := run(context.Background(), 12, 4, &out)
	if errors.Is(err, pgtest.ErrNotFound) && os.Getenv("CI") == "" {
		t.Skip(err)
	}
	if err != nil {
		t.Fatalf("%v\n%s", err, out.String())
	}
	if !strings.Contains(out.String(), "12 workspaces migrated") || !strings.Contains(out.String(), "budget of 4") {
		t.Fatalf("unexpected output:\n%s", out.String())
	}
	t.Log(out.String())
}
