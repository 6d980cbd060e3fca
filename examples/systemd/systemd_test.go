//go:build linux

package systemd_test

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/graceful-go/graceful/internal/loadtest"
)

// outer runs in a mount namespace of its own (nothing is mounted in the
// test's): it makes a cgroup for the machine, starts the namespaces'
// helper in it, and once PID 1 exists moves the helper back out, so that
// systemd finds only its own processes in its cgroup.
const outer = `set -e
W=$1 BOOT=$2
mkdir -p $W/cg
mount -t cgroup2 none $W/cg
ORIG=$W/cg$(sed -n 's/^0:://p' /proc/self/cgroup)
CG=$W/cg/graceful-test-$$
mkdir $CG
cleanup() {
	# systemd's own sub-cgroups first; whatever is left says so.
	[ -d $CG ] && find $CG -depth -type d -exec rmdir {} + || true
	umount $W/cg
}
trap cleanup EXIT
( echo $BASHPID > $CG/cgroup.procs; exec unshare --pid --mount --uts --ipc --net --cgroup --fork --kill-child bash $BOOT $W ) &
HELPER=$!
i=0; while [ ! -e $W/forked ]; do i=$((i+1)); [ $i -lt 3000 ] || exit 1; sleep 0.01; done
echo $HELPER > $ORIG/cgroup.procs
touch $W/go
status=0; wait $HELPER || status=$?
exit $status
`

// boot runs as PID 1 of the new namespaces: a throw-away root (an overlay
// of / with a tmpfs upper layer), fresh /proc, read-only /sys, cgroup2, a
// tmpfs /dev with its basic nodes, tmpfs /run and /tmp, a new machine-id,
// the units and binaries installed, basic.target as the default; then
// systemd.
const boot = `set -e
W=$1
touch $W/forked
i=0; while [ ! -e $W/go ]; do i=$((i+1)); [ $i -lt 3000 ] || exit 1; sleep 0.01; done
mount --make-rprivate /
mkdir -p $W/m && mount -t tmpfs tmpfs $W/m
mkdir -p $W/m/upper $W/m/work $W/m/root
R=$W/m/root
mount -t overlay overlay -o lowerdir=/,upperdir=$W/m/upper,workdir=$W/m/work $R
mount -t proc proc $R/proc
mount -t sysfs -o ro sysfs $R/sys
mount -t cgroup2 cgroup2 $R/sys/fs/cgroup
mount -t tmpfs -o mode=755 tmpfs $R/dev
for n in null:1:3 zero:1:5 full:1:7 random:1:8 urandom:1:9 tty:5:0; do
	IFS=: read name major minor <<< "$n"; mknod -m 666 $R/dev/$name c $major $minor
done
mkdir -p $R/dev/pts $R/dev/shm
mount -t devpts -o newinstance,ptmxmode=0666 devpts $R/dev/pts
ln -s pts/ptmx $R/dev/ptmx
mount -t tmpfs tmpfs $R/run
mount -t tmpfs tmpfs $R/tmp
head -c16 /dev/urandom | od -An -tx1 | tr -d ' \n' > $R/etc/machine-id
mkdir -p $R/etc/systemd/system $R/usr/local/bin
cp $W/bin/* $R/usr/local/bin/
cp $W/units/* $R/etc/systemd/system/
ln -sf /lib/systemd/system/basic.target $R/etc/systemd/system/default.target
hostname graceful-test
export container=other
exec chroot $R /lib/systemd/systemd
`

// machine is systemd booted as PID 1 of its own namespaces.
type machine struct {
	t    *testing.T
	pid  int // systemd, as the host sees it
	root string
	dial func(ctx context.Context, network, addr string) (net.Conn, error)
}

// bootMachine boots systemd with bins in /usr/local/bin and units in
// /etc/systemd/system, and powers it off when the test ends.
func bootMachine(t *testing.T, ctx context.Context, bins, units []string) *machine {
	t.Helper()
	w := t.TempDir()
	for sub, files := range map[string][]string{"bin": bins, "units": units} {
		require.NoError(t, os.MkdirAll(filepath.Join(w, sub), 0o755))
		for _, f := range files {
			b, err := os.ReadFile(f)
			require.NoError(t, err)
			mode := os.FileMode(0o644)
			if sub == "bin" {
				mode = 0o755
			}
			require.NoError(t, os.WriteFile(filepath.Join(w, sub, filepath.Base(f)), b, mode))
		}
	}
	bootFile := filepath.Join(w, "boot.sh")
	require.NoError(t, os.WriteFile(bootFile, []byte(boot), 0o755))
	var logs bytes.Buffer
	cmd := exec.Command("unshare", "--mount", "--propagation", "private", "--", "bash", "-c", outer, "outer", w, bootFile)
	cmd.Stdout, cmd.Stderr = &logs, &logs
	cmd.WaitDelay = 5 * time.Second // the machine's processes hold the output pipe
	require.NoError(t, cmd.Start())
	done := make(chan struct{})
	go func() {
		defer close(done)
		cmd.Wait()
	}()
	m := &machine{t: t}
	t.Cleanup(func() {
		if m.pid != 0 {
			m.run("systemctl", "poweroff")
		}
		select {
		case <-done:
		case <-time.After(30 * time.Second):
			// SIGKILL to PID 1 ends its namespace; the helper and the
			// outer shell follow.
			if m.pid != 0 {
				unix.Kill(m.pid, unix.SIGKILL)
			}
			cmd.Process.Kill()
			<-done
		}
		if t.Failed() {
			t.Logf("boot logs:\n%s", logs.String())
		}
	})
	// systemd is the helper's child, PID 1 inside.
	for deadline := time.Now().Add(30 * time.Second); m.pid == 0; time.Sleep(10 * time.Millisecond) {
		require.False(t, time.Now().After(deadline), "systemd did not start") // the logs follow, from Cleanup
		for _, helper := range loadtest.Children(cmd.Process.Pid) {
			for _, c := range loadtest.Children(helper) {
				if exe, _ := os.Readlink(fmt.Sprintf("/proc/%d/exe", c)); strings.HasSuffix(exe, "/systemd") {
					m.pid = c
				}
			}
		}
	}
	m.root = fmt.Sprintf("/proc/%d/root", m.pid)
	m.dial = netnsDialer(fmt.Sprintf("/proc/%d/ns/net", m.pid))
	for deadline := time.Now().Add(60 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		out, _ := m.run("systemctl", "is-system-running")
		if out == "running" || out == "degraded" {
			break
		}
		require.False(t, time.Now().After(deadline), "systemd did not finish booting: %q", out)
	}
	return m
}

// run runs a command inside the machine and returns its output, trimmed.
func (m *machine) run(args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "nsenter", append([]string{"-t", fmt.Sprint(m.pid), "-a", "-r", "-w"}, args...)...)
	out, err := cmd.CombinedOutput()
	return strings.TrimSpace(string(out)), err
}

// must runs a command inside the machine that must succeed.
func (m *machine) must(args ...string) string {
	m.t.Helper()
	out, err := m.run(args...)
	if err != nil {
		journal, _ := m.run("journalctl", "--no-pager", "-n", "60")
		m.t.Fatalf("%q: %v: %s\njournal:\n%s", args, err, out, journal)
	}
	return out
}

func (m *machine) show(unit, prop string) string {
	m.t.Helper()
	return m.must("systemctl", "show", "-p", prop, "--value", unit)
}

// netnsDialer dials from inside the network namespace at path: each
// connection's socket is made on a thread that joined it (and that thread
// ends with its goroutine).
func netnsDialer(path string) func(ctx context.Context, network, addr string) (net.Conn, error) {
	return func(ctx context.Context, network, addr string) (net.Conn, error) {
		type result struct {
			c   net.Conn
			err error
		}
		ch := make(chan result, 1)
		go func() {
			runtime.LockOSThread() // not unlocked: the thread is discarded
			f, err := os.Open(path)
			if err == nil {
				err = unix.Setns(int(f.Fd()), unix.CLONE_NEWNET)
				f.Close()
			}
			if err != nil {
				ch <- result{nil, err}
				return
			}
			c, err := (&net.Dialer{}).DialContext(ctx, network, addr)
			ch <- result{c, err}
		}()
		r := <-ch
		return r.c, r.err
	}
}

// slow starts n requests of ms milliseconds, returns once each has been
// written to its connection (the server reads it, drain or not), and then
// the channel of their status codes (0: failed).
func slow(t *testing.T, m *machine, n, ms int) <-chan int {
	t.Helper()
	codes := make(chan int, n)
	var sent sync.WaitGroup
	for range n {
		sent.Add(1)
		go func() {
			// On a connection the server has accepted and served once: one
			// still in the listen queue when the final drain closes the
			// listener is reset by the kernel, whoever serves.
			c, err := m.dial(context.Background(), "tcp", "127.0.0.1:8080")
			var br *bufio.Reader
			if err == nil {
				c.SetDeadline(time.Now().Add(time.Minute))
				br = bufio.NewReader(c)
				_, err = fmt.Fprintf(c, "GET / HTTP/1.1\r\nHost: t\r\n\r\n")
			}
			if err == nil {
				var first *http.Response
				if first, err = http.ReadResponse(br, nil); err == nil {
					io.Copy(io.Discard, first.Body)
					first.Body.Close()
					_, err = fmt.Fprintf(c, "GET /slow?ms=%d HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n", ms)
				}
			}
			sent.Done()
			if err != nil {
				codes <- 0
				return
			}
			defer c.Close()
			resp, err := http.ReadResponse(br, nil)
			if err != nil {
				codes <- 0
				return
			}
			io.Copy(io.Discard, resp.Body)
			codes <- resp.StatusCode
		}()
	}
	sent.Wait()
	return codes
}

// TestUnderSystemd installs the units of this directory as shipped in a
// real systemd (252 here), booted as PID 1 of its own PID, mount, UTS,
// IPC, network and cgroup namespaces, and checks under load: reloads lose
// nothing and the main PID stays the supervisor's; a broken binary's
// reload exits non-zero while the old process serves on; a stop after
// upgrades answers every request in flight and ends Result=success; the
// watchdog follows the generations; restarts of the socket-activated
// service after upgrades lose nothing.
func TestUnderSystemd(t *testing.T) {
	switch {
	case os.Geteuid() != 0:
		t.Skip("needs root to boot systemd in namespaces")
	case !exists("/lib/systemd/systemd"):
		t.Skip("systemd is not installed")
	}
	for _, tool := range []string{"unshare", "nsenter", "bash", "mount"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("needs %s", tool)
		}
	}
	if err := exec.Command("unshare", "--pid", "--mount", "--net", "--cgroup", "--fork", "true").Run(); err != nil {
		t.Skipf("namespaces not available: %v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	dir := t.TempDir()
	ctl, err := loadtest.Build(ctx, dir, "github.com/graceful-go/graceful/cmd/gracefulctl", false)
	require.NoError(t, err)
	server, err := loadtest.Build(ctx, dir, "github.com/graceful-go/graceful/examples/httpserver", false)
	require.NoError(t, err)
	units, err := filepath.Glob("*.service")
	require.NoError(t, err)
	sockets, err := filepath.Glob("*.socket")
	require.NoError(t, err)
	// A short watchdog, to see it follow the generations within the test.
	const reloads = 12 // at about 0.3 s each, longer than the watchdog
	dropin := filepath.Join(dir, "watchdog.conf")
	require.NoError(t, os.WriteFile(dropin, []byte("[Service]\nWatchdogSec=3\n"), 0o644))
	m := bootMachine(t, ctx, []string{ctl, server}, append(units, sockets...))
	m.must("mkdir", "-p", "/etc/systemd/system/httpserver.service.d")
	b, err := os.ReadFile(dropin)
	require.NoError(t, err)
	require.NoError(t, os.WriteFile(m.root+"/etc/systemd/system/httpserver.service.d/watchdog.conf", b, 0o644))
	m.must("systemctl", "daemon-reload")

	mix := loadtest.Mix{KeepAliveGET: 2, KeepAlivePOST: 1, FreshGET: 1, Slow: 1, SSE: 1, WS: 1, Dial: m.dial}
	binary := m.root + "/usr/local/bin/httpserver"
	good, err := os.ReadFile(binary)
	require.NoError(t, err)
	deploy := func(content []byte) {
		require.NoError(t, loadtest.WriteExecutable(binary, bytes.NewReader(content)))
	}

	t.Run("httpserver.service", func(t *testing.T) {
		m.t = t
		t.Cleanup(func() {
			if t.Failed() { // what the service said, for the failure's cause
				journal, _ := m.run("journalctl", "--no-pager", "-u", "httpserver", "-n", "300")
				t.Logf("journal of httpserver.service:\n%s", journal)
			}
			m.run("systemctl", "stop", "httpserver")
		})
		m.must("systemctl", "start", "httpserver")
		main := m.show("httpserver", "MainPID")
		load := loadtest.StartLoad("127.0.0.1:8080", mix)
		// More reloads in a row than the watchdog's interval holds: each
		// generation lives less than half of it, so it must ping as it
		// becomes ready, not only half an interval later.
		for i := range reloads {
			m.must("systemctl", "reload", "httpserver")
			assert.Equal(t, main, m.show("httpserver", "MainPID"), "reload %d: the main PID stays the supervisor's", i)
		}
		deploy([]byte("#!/bin/sh\necho 'broken build' >&2\nexit 3\n"))
		out, err := m.run("systemctl", "reload", "httpserver")
		assert.Error(t, err, "a broken binary's reload fails: %s", out)
		deploy(good)
		assert.Equal(t, "active", m.show("httpserver", "ActiveState"), "the old process serves on")
		// The watchdog, 3 s here, is fed by the serving generation: a ping
		// after the last reload, and no restart.
		ping := m.show("httpserver", "WatchdogTimestampMonotonic")
		for deadline := time.Now().Add(10 * time.Second); m.show("httpserver", "WatchdogTimestampMonotonic") == ping; time.Sleep(100 * time.Millisecond) {
			require.False(t, time.Now().After(deadline), "no watchdog ping after the reloads")
		}
		stats := load.Stop()
		assert.Zero(t, stats.Failed(), "failures: %v %v", stats.Failures, stats.Samples)
		assert.GreaterOrEqual(t, len(stats.PIDs), reloads+1, "answered by every generation")
		assert.Equal(t, "0", m.show("httpserver", "NRestarts"))

		codes := slow(t, m, 3, 2000)
		start := time.Now()
		m.must("systemctl", "stop", "httpserver")
		took := time.Since(start)
		for range 3 {
			assert.Equal(t, http.StatusOK, <-codes, "a request in flight at the stop was answered")
		}
		assert.Equal(t, "success", m.show("httpserver", "Result"))
		t.Logf("stop after %d reloads under load: 3 of 3 requests in flight answered, took %v; %d requests, 0 failed", reloads, took.Round(time.Millisecond), stats.Requests)
	})

	t.Run("httpserver-activated", func(t *testing.T) {
		m.t = t
		t.Cleanup(func() { m.run("systemctl", "stop", "httpserver-activated.service", "httpserver-activated.socket") })
		m.must("systemctl", "start", "httpserver-activated.socket")
		m.must("systemctl", "start", "httpserver-activated.service")
		load := loadtest.StartLoad("127.0.0.1:8080", mix)
		for range 5 {
			m.must("systemctl", "reload", "httpserver-activated.service")
		}
		codes := slow(t, m, 3, 2000)
		start := time.Now()
		m.must("systemctl", "restart", "httpserver-activated.service")
		took := time.Since(start)
		for range 3 {
			assert.Equal(t, http.StatusOK, <-codes, "a request in flight at the restart was answered")
		}
		// Served again by the new supervisor's server, through the socket
		// systemd held meanwhile.
		for range 3 {
			m.must("systemctl", "reload", "httpserver-activated.service")
		}
		stats := load.Stop()
		assert.Zero(t, stats.Failed(), "failures: %v %v", stats.Failures, stats.Samples)
		assert.Equal(t, "active", m.show("httpserver-activated.service", "ActiveState"))
		t.Logf("restart after 5 reloads under load: 3 of 3 requests in flight answered, took %v; %d requests, 0 failed", took.Round(time.Millisecond), stats.Requests)
		m.must("systemctl", "stop", "httpserver-activated.service", "httpserver-activated.socket")
	})
}

func exists(path string) bool {
	_, err := os.Stat(path)
	return err == nil
}
