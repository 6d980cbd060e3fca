package graceful_test

import (
	"os/exec"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

// TestCoreDependencies keeps what every user builds small: the core package
// imports only the standard library, tableflip, x/sys and go-systemd's
// daemon package. gRPC and WebSocket code live in subpackages and examples.
func TestCoreDependencies(t *testing.T) {
	out, err := exec.Command("go", "list", "-deps", "-f", "{{if not .Standard}}{{.ImportPath}}{{end}}", "github.com/graceful-go/graceful").CombinedOutput()
	require.NoError(t, err, "%s", out)
	allowed := []string{
		"github.com/graceful-go/graceful",
		"github.com/cloudflare/tableflip",
		"golang.org/x/sys/",
		"github.com/coreos/go-systemd/v22/daemon",
	}
	for _, pkg := range strings.Fields(string(out)) {
		ok := false
		for _, a := range allowed {
			if pkg == a || strings.HasPrefix(pkg, a) || strings.HasPrefix(pkg, a+"/") {
				ok = true
			}
		}
		require.True(t, ok, "the core package depends on %s", pkg)
	}
}
