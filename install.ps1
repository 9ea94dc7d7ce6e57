# Vampire installer for Windows, no admin rights needed:
#
#   irm https://github.com/vampire-gateway/vampire/releases/latest/download/install.ps1 | iex
#   & ([scriptblock]::Create((irm .../install.ps1))) -Uninstall     # or -Purge
#   powershell -ExecutionPolicy Bypass -File install.ps1 [-Uninstall] [-Purge]
#
# Environment: VAMPIRE_VERSION (e.g. 0.1.0; unset: the latest release), VAMPIRE_DOWNLOAD_URL (a mirror),
# VAMPIRE_NO_SERVICE=1 (skip the background service).
#
# Installs vampire.exe (console) and vampirew.exe (windowless, used by the logon task) into
# %LOCALAPPDATA%\Programs\vampire and adds that folder to the user PATH.

param(
    [switch]$Uninstall,
    [switch]$Purge
)

# Everything runs in a child scope: `irm | iex` evaluates in the caller's session, which must not keep
# this script's preferences and functions.
& {
    $ErrorActionPreference = 'Stop'
    $ProgressPreference = 'SilentlyContinue'  # the progress bar makes Invoke-WebRequest many times slower

    $Releases = 'https://github.com/vampire-gateway/vampire/releases'
    $InstallDir = Join-Path $env:LOCALAPPDATA 'Programs\vampire'

    function Get-Arch {
        # PROCESSOR_ARCHITEW6432 is set when a 32-bit PowerShell runs on a 64-bit Windows.
        $arch = if ($env:PROCESSOR_ARCHITEW6432) { $env:PROCESSOR_ARCHITEW6432 } else { $env:PROCESSOR_ARCHITECTURE }
        switch ($arch) {
            'AMD64' { return 'x86_64' }
            'ARM64' { return 'x86_64' }  # Windows on ARM runs the x86_64 build under emulation
            default { throw "Unsupported CPU architecture: $arch (Vampire ships x86_64 binaries for Windows)." }
        }
    }

    function Get-Asset([string]$Base, [string]$Name, [string]$Dest) {
        try {
            Invoke-WebRequest -UseBasicParsing -Uri "$Base/$Name" -OutFile $Dest
        } catch {
            throw "Could not download $Base/$Name : $($_.Exception.Message)"
        }
    }

    function Get-ExpectedHash([string]$SumsFile, [string]$Name) {
        foreach ($line in Get-Content -LiteralPath $SumsFile) {
            $parts = $line.Trim() -split '\s+', 2
            if ($parts.Count -eq 2 -and $parts[1].TrimStart('*') -eq $Name) { return $parts[0].ToLowerInvariant() }
        }
        return $null
    }

    function Invoke-Quiet([scriptblock]$Block) {
        # Windows PowerShell 5.1 turns a native command's redirected stderr into a terminating error under
        # ErrorActionPreference=Stop; these calls are allowed to fail.
        $previous = $ErrorActionPreference
        $ErrorActionPreference = 'Continue'
        try { & $Block *> $null } catch { $null = $_ } finally { $ErrorActionPreference = $previous }
    }

    function Set-UserPath([string]$Dir, [bool]$Add) {
        # Read and write the raw registry value: [Environment]::SetEnvironmentVariable would store PATH as
        # REG_SZ with every %VARIABLE% in it expanded for good.
        $key = [Microsoft.Win32.Registry]::CurrentUser.OpenSubKey('Environment', $true)
        try {
            $current = $key.GetValue('Path', '', [Microsoft.Win32.RegistryValueOptions]::DoNotExpandEnvironmentNames)
            $entries = @($current -split ';' | Where-Object { $_ -and ($_.TrimEnd('\') -ne $Dir.TrimEnd('\')) })
            if ($Add) { $entries += $Dir }
            $key.SetValue('Path', ($entries -join ';'), [Microsoft.Win32.RegistryValueKind]::ExpandString)
        } finally {
            $key.Close()
        }
        # Setting any user variable broadcasts WM_SETTINGCHANGE, so new terminals see the new PATH.
        [Environment]::SetEnvironmentVariable('VAMPIRE_INSTALL_REFRESH', '1', 'User')
        [Environment]::SetEnvironmentVariable('VAMPIRE_INSTALL_REFRESH', $null, 'User')
        if ($Add -and (($env:Path -split ';') -notcontains $Dir)) { $env:Path = "$env:Path;$Dir" }
    }

    function Invoke-Uninstall([bool]$PurgeData) {
        $exe = Join-Path $InstallDir 'vampire.exe'
        if (Test-Path -LiteralPath $exe) {
            & $exe service uninstall
            if ($LASTEXITCODE -ne 0) { Write-Warning "'vampire service uninstall' failed; removing what is left." }
            Invoke-Quiet { & $exe down }
        }
        # Leftovers of a missing or broken binary: the logon task and the Run entry.
        Invoke-Quiet { schtasks /Delete /TN Vampire /F }
        Remove-ItemProperty -Path 'HKCU:\Software\Microsoft\Windows\CurrentVersion\Run' -Name 'Vampire' -ErrorAction SilentlyContinue
        if (Test-Path -LiteralPath $InstallDir) {
            Remove-Item -LiteralPath $InstallDir -Recurse -Force
            Write-Host "Removed $InstallDir"
        }
        Set-UserPath $InstallDir $false
        if ($PurgeData) {
            foreach ($dir in @((Join-Path $env:LOCALAPPDATA 'vampire'), (Join-Path $env:APPDATA 'vampire'))) {
                if (Test-Path -LiteralPath $dir) {
                    Remove-Item -LiteralPath $dir -Recurse -Force
                    Write-Host "Removed $dir"
                }
            }
        }
        Write-Host 'Vampire is uninstalled.'
    }

    function Invoke-Install {
        $arch = Get-Arch
        $version = "$env:VAMPIRE_VERSION".TrimStart('v')
        if ($env:VAMPIRE_DOWNLOAD_URL) { $base = $env:VAMPIRE_DOWNLOAD_URL.TrimEnd('/') }
        elseif ($version) { $base = "$Releases/download/v$version" }
        else { $base = "$Releases/latest/download" }

        $tmp = Join-Path ([IO.Path]::GetTempPath()) ("vampire-install-" + [Guid]::NewGuid())
        New-Item -ItemType Directory -Path $tmp | Out-Null
        try {
            Write-Host "Downloading SHA256SUMS from $base ..."
            $sums = Join-Path $tmp 'SHA256SUMS'
            Get-Asset $base 'SHA256SUMS' $sums
            if (-not $version) {
                # The latest release's version is only known from its asset names.
                $match = Select-String -LiteralPath $sums -Pattern "\*?vampire-(\S+)-windows-$arch\.exe$" | Select-Object -First 1
                if (-not $match) { throw "The latest release has no binary for windows-$arch." }
                $version = $match.Matches[0].Groups[1].Value
            }
            $installed = @()
            foreach ($flavour in @('vampire', 'vampirew')) {
                $asset = "$flavour-$version-windows-$arch.exe"
                $expected = Get-ExpectedHash $sums $asset
                if (-not $expected) { throw "SHA256SUMS lists no $asset : is version $version published?" }
                Write-Host "Downloading $asset ..."
                $file = Join-Path $tmp $asset
                Get-Asset $base $asset $file
                $actual = (Get-FileHash -Algorithm SHA256 -LiteralPath $file).Hash.ToLowerInvariant()
                if ($actual -ne $expected) {
                    throw "SHA-256 mismatch for $asset : expected $expected, got $actual. The download is corrupt or was tampered with; nothing was installed."
                }
                $installed += @{ File = $file; Name = "$flavour.exe" }
            }
            Write-Host 'SHA-256 verified.'

            New-Item -ItemType Directory -Force -Path $InstallDir | Out-Null
            $exe = Join-Path $InstallDir 'vampire.exe'
            if (Test-Path -LiteralPath $exe) {
                # A running vampire.exe cannot be overwritten; stop the managed and unmanaged copies first.
                Invoke-Quiet { & $exe service stop }
                Invoke-Quiet { & $exe down }
            }
            foreach ($item in $installed) {
                $target = Join-Path $InstallDir $item.Name
                Copy-Item -LiteralPath $item.File -Destination "$target.new" -Force
                Move-Item -LiteralPath "$target.new" -Destination $target -Force
            }
            $reported = & $exe version
            if ($LASTEXITCODE -ne 0) { throw "The installed binary does not run: $reported" }
            Write-Host "Installed $exe ($reported)."
        } finally {
            Remove-Item -LiteralPath $tmp -Recurse -Force -ErrorAction SilentlyContinue
        }

        Set-UserPath $InstallDir $true
        Write-Host "$InstallDir is on your user PATH (open a new terminal to use 'vampire')."

        if ($env:VAMPIRE_NO_SERVICE -eq '1') {
            Write-Host 'VAMPIRE_NO_SERVICE=1: the background service was not installed. Start Vampire with: vampire up'
            return
        }
        Write-Host 'Registering the background service (a logon task for this user) ...'
        & $exe service install
        if ($LASTEXITCODE -eq 0) {
            Write-Host 'Vampire runs in the background at http://127.0.0.1:7777 (dashboard) and http://127.0.0.1:7777/v1 (API).'
        } else {
            Write-Host ''
            Write-Host 'NOTICE: the background service was not started. Vampire itself is installed.'
            Write-Host 'Start it when you need it:  vampire up      (stop it with: vampire down)'
        }
    }

    if ($Uninstall -or $Purge) { Invoke-Uninstall $Purge.IsPresent } else { Invoke-Install }
}
