package framework

import (
	"context"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// startShell runs script with /bin/sh and returns the process and the PID of the
// background child that the script writes to child.pid.
func startShell(t *testing.T, script string) (*Process, int) {
	t.Helper()
	dir := t.TempDir()
	pidFile := filepath.Join(dir, "child.pid")
	p, err := StartProcess(dir, "shell", []string{"PID_FILE=" + pidFile}, "/bin/sh", "-c", script)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(p.Kill)
	var child int
	err = p.WaitReady(t.Context(), 10*time.Second, func(context.Context) error {
		data, err := os.ReadFile(pidFile)
		if err != nil {
			return err
		}
		child, err = strconv.Atoi(strings.TrimSpace(string(data)))
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	return p, child
}

// waitGone waits until pid no longer exists or is a zombie waiting for init.
func waitGone(t *testing.T, pid int) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) {
		stat, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "stat"))
		if errors.Is(err, os.ErrNotExist) {
			return
		}
		// The state follows the parenthesized command name.
		if err == nil {
			if _, after, ok := strings.Cut(string(stat), ") "); ok && strings.HasPrefix(after, "Z") {
				return
			}
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Errorf("process %d still running", pid)
}

func TestProcessStopEndsProcessGroup(t *testing.T) {
	p, child := startShell(t, `sleep 300 & echo $! >"$PID_FILE"; wait`)
	if exited, err := p.Exited(); exited {
		t.Fatalf("shell exited early: %v", err)
	}
	start := time.Now()
	p.Stop()
	if elapsed := time.Since(start); elapsed >= DefaultStopGracePeriod {
		t.Errorf("Stop took %v, SIGTERM should have been enough", elapsed)
	}
	if exited, err := p.Exited(); !exited || err == nil || !strings.Contains(err.Error(), "terminated") {
		t.Errorf("Exited() = %t, %v, want true and an error for SIGTERM", exited, err)
	}
	waitGone(t, child)
}

func TestProcessStopKillsWhatIgnoresSIGTERM(t *testing.T) {
	p, child := startShell(t, `trap '' TERM; sleep 300 & echo $! >"$PID_FILE"; wait`)
	p.StopGracePeriod = 200 * time.Millisecond
	p.Stop()
	if exited, err := p.Exited(); !exited || err == nil || !strings.Contains(err.Error(), "killed") {
		t.Errorf("Exited() = %t, %v, want true and an error for SIGKILL", exited, err)
	}
	waitGone(t, child)
	// A second Stop returns at once.
	p.Stop()
}

func TestProcessWaitReadyReportsExitAndLog(t *testing.T) {
	dir := t.TempDir()
	p, err := StartProcess(dir, "failing", nil, "/bin/sh", "-c", "echo first line; echo cannot bind port >&2; exit 3")
	if err != nil {
		t.Fatal(err)
	}
	defer p.Stop()
	err = p.WaitReady(t.Context(), 10*time.Second, func(context.Context) error { return errors.New("not yet") })
	if err == nil {
		t.Fatal("WaitReady succeeded for a process that exited")
	}
	for _, want := range []string{"failing exited before it became ready", "exit status 3", "first line", "cannot bind port"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not contain %q", err, want)
		}
	}
}

func TestProcessWaitReadyTimeout(t *testing.T) {
	p, _ := startShell(t, `echo still starting; sleep 300 & echo $! >"$PID_FILE"; wait`)
	defer p.Stop()
	err := p.WaitReady(t.Context(), 300*time.Millisecond, func(context.Context) error { return errors.New("port closed") })
	if err == nil {
		t.Fatal("WaitReady succeeded although the check always fails")
	}
	for _, want := range []string{"shell not ready after", "port closed", "still starting"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not contain %q", err, want)
		}
	}
}

func TestStartProcessMissingBinary(t *testing.T) {
	_, err := StartProcess(t.TempDir(), "missing", nil, filepath.Join(t.TempDir(), "no-such-binary"))
	if !errors.Is(err, os.ErrNotExist) {
		t.Errorf("StartProcess of a missing binary: got %v, want an error wrapping os.ErrNotExist", err)
	}
}

func TestStartRequiresBinaries(t *testing.T) {
	t.Setenv(BinDirEnv, "")
	if _, err := Start(t.Context(), Options{}); err == nil || !strings.Contains(err.Error(), BinDirEnv+" is not set") {
		t.Errorf("Start without %s: got %v", BinDirEnv, err)
	}
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "etcd"), nil, 0o755); err != nil {
		t.Fatal(err)
	}
	_, err := Start(t.Context(), Options{BinDir: dir})
	if err == nil || !strings.Contains(err.Error(), "lacks kube-apiserver, kube-scheduler, kube-controller-manager, kubectl") {
		t.Errorf("Start with only etcd: got %v", err)
	}
}

func TestPKI(t *testing.T) {
	p, err := newPKI(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(p.CAData) {
		t.Fatal("CA data holds no certificate")
	}
	data, err := os.ReadFile(p.ServingCert)
	if err != nil {
		t.Fatal(err)
	}
	block, _ := pem.Decode(data)
	if block == nil {
		t.Fatalf("%s holds no PEM block", p.ServingCert)
	}
	cert, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	for _, host := range []string{"127.0.0.1", "localhost"} {
		if _, err := cert.Verify(x509.VerifyOptions{Roots: roots, DNSName: host}); err != nil {
			t.Errorf("serving certificate for %s: %v", host, err)
		}
	}
	if _, err := cert.Verify(x509.VerifyOptions{Roots: roots, DNSName: "example.com"}); err == nil {
		t.Error("serving certificate is valid for example.com")
	}
	for _, f := range []string{p.ServingKey, p.SAPrivateKey, p.SAPublicKey} {
		info, err := os.Stat(f)
		if err != nil {
			t.Error(err)
		} else if info.Size() == 0 {
			t.Errorf("%s is empty", f)
		}
	}
}
