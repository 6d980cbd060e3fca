package main

import (
	"encoding/json"
	"flag"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// parseArgs parses args with the reference server's own flags.
func parseArgs(t *testing.T, args []string) *config {
	t.Helper()
	fs := flag.NewFlagSet("httpserver", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	c := defineFlags(fs)
	require.NoError(t, fs.Parse(args), "flags %q", args)
	require.Empty(t, fs.Args(), "stray arguments in %q", args)
	return c
}

// unitKeys returns the Key=value lines of a systemd unit, comments dropped.
func unitKeys(t *testing.T, path string) map[string]string {
	t.Helper()
	b, err := os.ReadFile(path)
	require.NoError(t, err)
	keys := map[string]string{}
	for _, line := range strings.Split(string(b), "\n") {
		line = strings.TrimSpace(line)
		if line == "" || line[0] == '#' || line[0] == '[' {
			continue
		}
		k, v, ok := strings.Cut(line, "=")
		require.True(t, ok, "%s: malformed line %q", path, line)
		keys[k] = v
	}
	return keys
}

func seconds(t *testing.T, s string) time.Duration {
	t.Helper()
	n, err := strconv.Atoi(s)
	require.NoError(t, err)
	return time.Duration(n) * time.Second
}

// TestRecipes keeps the deployment recipes under examples/ true to the
// reference server: their flags parse, paths agree, and the service
// managers' timeouts leave room for the upgrade and the drain.
func TestRecipes(t *testing.T) {
	const margin = 5 * time.Second // what a drain may take past its deadline

	units, err := filepath.Glob("../systemd/*.service")
	require.NoError(t, err)
	require.Len(t, units, 3)
	for _, unit := range units {
		t.Run(filepath.Base(unit), func(t *testing.T) {
			k := unitKeys(t, unit)
			start := strings.Fields(k["ExecStart"])
			// The supervisor is the main process for the service's life:
			// systemd then waits for the drain at stop and restart after
			// upgrades (it does not for a main process not its child).
			require.Greater(t, len(start), 4)
			assert.Equal(t, []string{"/usr/local/bin/gracefulctl", "supervise", "--", "/usr/local/bin/httpserver"}, start[:4])
			c := parseArgs(t, start[4:])
			assert.Empty(t, k["PIDFile"], "no PIDFile=: it would make the server, not the supervisor, the main process")
			assert.Equal(t, "main", k["NotifyAccess"], "only the supervisor speaks to systemd")
			assert.Equal(t, "mixed", k["KillMode"], "SIGTERM to the supervisor alone, which passes it on once")
			assert.Contains(t, []string{"notify", "notify-reload"}, k["Type"])
			assert.GreaterOrEqual(t, seconds(t, k["TimeoutStopSec"]), c.delay+c.drain+margin)
			assert.Greater(t, seconds(t, k["TimeoutStartSec"]), c.upgrade, "the reload is bounded by -upgrade-timeout")
			if k["Type"] == "notify" {
				assert.Greater(t, seconds(t, k["TimeoutStartSec"]), c.drain+margin+c.upgrade, "a reload through gracefulctl first waits for the previous drain")
				reload := strings.Fields(k["ExecReload"])
				require.Equal(t, []string{"/usr/local/bin/gracefulctl", "-socket", c.control, "upgrade"}, reload)
				assert.NotEmpty(t, c.control)
			} else {
				assert.Equal(t, "SIGHUP", k["ReloadSignal"])
			}
		})
	}

	sock := unitKeys(t, "../systemd/httpserver-activated.socket")
	svc := unitKeys(t, "../systemd/httpserver-activated.service")
	c := parseArgs(t, strings.Fields(svc["ExecStart"])[4:])
	assert.Equal(t, ":"+sock["ListenStream"], c.addr, "-addr names the activated socket")

	b, err := os.ReadFile("../kubernetes/deployment.yaml")
	require.NoError(t, err)
	m := regexp.MustCompile(`(?m)^\s+args: (\[.*\])$`).FindSubmatch(b)
	require.NotNil(t, m, "deployment has container args")
	var args []string
	require.NoError(t, json.Unmarshal(m[1], &args))
	c = parseArgs(t, args)
	assert.Positive(t, c.delay, "a drain delay lets endpoints update before the listener closes")
	m = regexp.MustCompile(`terminationGracePeriodSeconds: (\d+)`).FindSubmatch(b)
	require.NotNil(t, m)
	assert.GreaterOrEqual(t, seconds(t, string(m[1])), c.delay+c.drain+margin)
	for _, probe := range []string{"path: /readyz", "path: /livez"} {
		assert.Contains(t, string(b), probe)
	}

	b, err = os.ReadFile("../docker/Dockerfile")
	require.NoError(t, err)
	m = regexp.MustCompile(`(?m)^ENTRYPOINT (\[.*\])$`).FindSubmatch(b)
	require.NotNil(t, m, "exec-form ENTRYPOINT: the supervisor is PID 1")
	require.NoError(t, json.Unmarshal(m[1], &args))
	require.Greater(t, len(args), 4)
	assert.Equal(t, []string{"/gracefulctl", "supervise", "--", "/srv/bin/httpserver"}, args[:4])
	c = parseArgs(t, args[4:])
	doc, err := os.ReadFile("../docker/README.md")
	require.NoError(t, err)
	m = regexp.MustCompile(`docker stop --time (\d+)`).FindSubmatch(doc)
	require.NotNil(t, m)
	assert.GreaterOrEqual(t, seconds(t, string(m[1])), c.delay+c.drain+margin)
}
